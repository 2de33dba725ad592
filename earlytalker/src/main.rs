//! earlytalker's command line: dispatch only. The agent itself is `daemon::run`.

use clap::{error::ErrorKind, CommandFactory, Parser};
use earlytalker::{
    config::{Cli, Command},
    daemon::{self, StartError},
    opensmtpd, status,
};
use std::process::ExitCode;

/// Bad flags, configuration, privilege or kernel feature: one line, status 2.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("earlytalker: error: {msg}");
    ExitCode::from(StartError::EXIT_STATUS)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line names the problem; the rest is usage boilerplate.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(format!(
                "{} (see --help)",
                first.trim_start_matches("error: ")
            ));
        }
    };
    match cli.command {
        Some(Command::Status {
            json,
            control_socket,
        }) => match status::client(&control_socket, json) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("{e:#}")),
        },
        Some(Command::OpensmtpdFilter {
            policy_socket,
            policy_listen,
        }) => {
            let to = match (policy_socket, policy_listen) {
                (Some(p), _) => opensmtpd::PolicyAddr::Unix(p),
                (None, Some(a)) => opensmtpd::PolicyAddr::Tcp(a),
                (None, None) => return fail("one of --policy-socket, --policy-listen is needed"),
            };
            match opensmtpd::run(to) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("earlytalker opensmtpd-filter: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Generate { dir }) => match generate(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("{e:#}")),
        },
        None => match daemon::run(cli.run) {
            Err(e) => fail(e),
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("earlytalker: fatal: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Man page and shell completions from the CLI definition (for packaging).
fn generate(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut man)?;
    std::fs::write(dir.join("earlytalker.8"), man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "earlytalker", dir)?;
    }
    Ok(())
}
