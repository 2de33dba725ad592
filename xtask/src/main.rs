//! Developer and operator tasks: `cargo xtask setup|build|run|demo|test|deb`.

mod deb;
mod demo;
mod deps;

use anyhow::{bail, Context, Result};
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

const USAGE: &str = "usage: cargo xtask <command>

  setup          make this machine able to build (nightly rust-src, LLVM, bpf-linker);
                 never installs an MTA or test tools
  build          setup, then build the agent (target/release/earlytalker)
  run [-- ARGS]  build, then run the agent as root; with no ARGS and nothing
                 listening on port 25, runs the demo instead
  demo           a bot and a polite client in network namespaces, caught live
  test           setup, build, install the test tools (iproute2, swaks, systemd)
                 and unpack private MTA copies into target/mta, then unit tests
                 and the privileged suite (root)
  fuzz [--count N] [--seed S]
                 differential fuzzing of the loaded kernel programs against
                 the reference model (root; default 1,000,000 packets)
  bench          figures (per-packet cost, session rate, holds at scale) as a
                 table and target/bench.json (root; not part of the tests)
  deb            build target/debian/earlytalker_VERSION_ARCH.deb (agent, unit,
                 config, man page, completions, fail2ban filter, dashboard)
  install [--destdir DIR]
                 build, then install the agent, systemd unit, example config,
                 man page and shell completions (under DIR when given)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build") => build(),
        Some("run") => run(&args[1..]),
        Some("demo") => require_root("demo")
            .and_then(|()| build())
            .and_then(|()| demo::run(&agent_bin())),
        Some("test") => test(&args[1..]),
        Some("install") => install(&args[1..]),
        Some("deb") => deb::deb().map(|_| ()),
        Some("bench") => require_root("bench").and_then(|()| bench()),
        Some("fuzz") => require_root("fuzz").and_then(|()| fuzz(&args[1..])),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        // A refusal to touch the host's packages is a usage error: nothing was done.
        Err(e) if e.downcast_ref::<deps::Refused>().is_some() => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn agent_bin() -> PathBuf {
    root_dir().join("target/release/earlytalker")
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask {what}` needs root (BPF programs, network namespaces); try: sudo -E cargo xtask {what}");
    }
    Ok(())
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// LLVM major version of the nightly rustc: bpf-linker must match it.
fn nightly_llvm_major() -> Result<u32> {
    let v = output("rustc", &["+nightly", "-vV"])
        .context("no nightly toolchain: run `rustup toolchain install nightly`")?;
    let line = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV names no LLVM version")?;
    line.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .context("odd LLVM version")
}

/// bpf-linker present and linked against LLVM `major` (or static).
fn bpf_linker_ok(major: u32) -> bool {
    let Some(path) = output("sh", &["-c", "command -v bpf-linker"]) else {
        return false;
    };
    let path = path.trim();
    match output("ldd", &[path]) {
        Some(l) => match l.lines().find(|l| l.contains("libLLVM")) {
            Some(line) => {
                line.contains(&format!("libLLVM.so.{major}"))
                    || line.contains(&format!("libLLVM-{major}"))
            }
            None => true,
        },
        None => true,
    }
}

/// Idempotent: checks each requirement and installs what is missing when it can
/// (root on Debian); otherwise prints exactly what to run.
fn setup() -> Result<()> {
    let can_install = is_root() && Path::new("/etc/debian_version").exists();
    let mut todo: Vec<String> = Vec::new();

    // rust-src builds core for the BPF target; rustfmt and clippy check the kernel
    // crate in CI (.ci/run).
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    for component in ["rust-src", "rustfmt", "clippy"] {
        if installed.lines().any(|l| l.starts_with(component)) {
            continue;
        }
        if can_install {
            status(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "nightly",
            ]))?;
        } else {
            todo.push(format!(
                "rustup component add {component} --toolchain nightly"
            ));
        }
    }

    let major = nightly_llvm_major()?;
    let llvm = format!("/usr/lib/llvm-{major}");
    // Only the build's own needs: this runs on relays (`run`, `install`).
    let pkgs = deps::build_packages(major);
    if can_install {
        deps::apt_install(&pkgs)?;
    } else {
        let missing: Vec<String> = pkgs.into_iter().filter(|p| !deps::installed(p)).collect();
        if !missing.is_empty() {
            todo.push(format!("apt-get install -y {}", missing.join(" ")));
        }
    }

    if !bpf_linker_ok(major) {
        let path = std::env::var("PATH").unwrap_or_default();
        let mut cmd = cargo();
        cmd.args([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("PATH", format!("{llvm}/bin:{path}"))
        .env(format!("LLVM_SYS_{major}1_PREFIX"), &llvm)
        .env("LLVM_PREFIX", &llvm);
        if todo.is_empty() {
            status(&mut cmd)?;
        } else {
            todo.push(format!(
                "PATH={llvm}/bin:$PATH LLVM_SYS_{major}1_PREFIX={llvm} LLVM_PREFIX={llvm} cargo install bpf-linker --force --no-default-features --features llvm-{major}"
            ));
        }
    }

    if !todo.is_empty() {
        eprintln!("This machine cannot build earlytalker yet. Run:");
        for t in &todo {
            eprintln!("  {t}");
        }
        bail!("setup incomplete");
    }
    println!("setup: nightly rust-src/rustfmt/clippy, LLVM {major} and bpf-linker are in place");
    Ok(())
}

fn build() -> Result<()> {
    setup()?;
    status(
        cargo()
            .current_dir(root_dir())
            .args(["build", "--release", "-p", "earlytalker"]),
    )
}

/// Is anything listening on TCP port 25 here (IPv4 or IPv6)?
fn smtp_listener_present() -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                // local_address is ADDR:PORT in hex; state 0A is LISTEN.
                cols.len() > 3 && cols[3] == "0A" && cols[1].ends_with(":0019")
            })
    })
}

fn run(args: &[String]) -> Result<()> {
    require_root("run")?;
    let args: Vec<String> = match args.first().map(String::as_str) {
        Some("--") => args[1..].to_vec(),
        _ => args.to_vec(),
    };
    build()?;
    if args.is_empty() && !smtp_listener_present() {
        println!("Nothing listens on port 25 here: showing the demo. To guard a real MTA:");
        println!("  sudo cargo xtask run -- --iface eth0 --action log\n");
        return demo::run(&agent_bin());
    }
    // exec: signals from the terminal reach the agent directly.
    let err = Command::new(agent_bin()).args(&args).exec();
    bail!("cannot start the agent: {err}")
}

/// Installs into `--destdir` (for packaging) or onto this host.
fn install(args: &[String]) -> Result<()> {
    let destdir = match args {
        [] => PathBuf::from("/"),
        [flag, dir] if flag == "--destdir" => PathBuf::from(dir),
        _ => bail!("usage: cargo xtask install [--destdir DIR]"),
    };
    if destdir == Path::new("/") {
        require_root("install")?;
    }
    build()?;
    let gen = root_dir().join("target/dist");
    status(Command::new(agent_bin()).arg("generate").arg(&gen))?;
    let dist = root_dir().join("earlytalker/dist");
    let at = |p: &str| destdir.join(p.trim_start_matches('/'));
    let put = |from: &Path, to: PathBuf, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(to.parent().expect("absolute path"))?;
        std::fs::copy(from, &to).with_context(|| format!("installing {}", to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        println!("installed {}", to.display());
        Ok(())
    };
    put(&agent_bin(), at("/usr/local/sbin/earlytalker"), 0o755)?;
    put(
        &dist.join("earlytalker.service"),
        at("/etc/systemd/system/earlytalker.service"),
        0o644,
    )?;
    let conf = at("/etc/earlytalker/earlytalker.toml");
    if conf.exists() {
        println!("kept {} (exists)", conf.display());
    } else {
        put(&dist.join("earlytalker.toml"), conf, 0o640)?;
    }
    put(
        &gen.join("earlytalker.8"),
        at("/usr/local/share/man/man8/earlytalker.8"),
        0o644,
    )?;
    put(
        &gen.join("earlytalker.bash"),
        at("/usr/local/share/bash-completion/completions/earlytalker"),
        0o644,
    )?;
    put(
        &gen.join("_earlytalker"),
        at("/usr/local/share/zsh/site-functions/_earlytalker"),
        0o644,
    )?;
    put(
        &gen.join("earlytalker.fish"),
        at("/usr/local/share/fish/vendor_completions.d/earlytalker.fish"),
        0o644,
    )?;
    if destdir == Path::new("/") {
        // Only where systemd runs this host.
        if Path::new("/run/systemd/system").exists() {
            status(Command::new("systemctl").arg("daemon-reload"))?;
        }
        println!("\nnext: edit /etc/earlytalker/earlytalker.toml, then: systemctl enable --now earlytalker");
    }
    Ok(())
}

/// Builds the agent, then one of the tests crate's binaries; returns its path.
fn build_test_bin(name: &str) -> Result<PathBuf> {
    build()?;
    status(cargo().current_dir(root_dir()).args([
        "build",
        "--release",
        "-p",
        "earlytalker-tests",
        "--bin",
        name,
    ]))?;
    Ok(root_dir().join("target/release").join(name))
}

/// What the suite and the bench run besides the agent: test tools, and private
/// MTA copies under target/mta (never an MTA installed on the host).
fn test_setup() -> Result<()> {
    if !Path::new("/etc/debian_version").exists() {
        bail!("the test suite installs its tools with apt: Debian or a derivative is needed");
    }
    deps::apt_install(
        &deps::TEST_PACKAGES
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>(),
    )?;
    deps::private_mtas(&root_dir())
}

fn bench() -> Result<()> {
    test_setup()?;
    let bin = build_test_bin("et-bench")?;
    status(
        Command::new(bin)
            .env("EARLYTALKER_BIN", agent_bin())
            .env("EARLYTALKER_MTA_ROOT", deps::mta_root(&root_dir())),
    )
}

fn fuzz(args: &[String]) -> Result<()> {
    let bin = build_test_bin("et-fuzz")?;
    status(Command::new(bin).args(args))
}

fn test(extra: &[String]) -> Result<()> {
    if !is_root() {
        eprintln!("SKIP: the earlytalker test suite loads BPF programs and builds network namespaces; it needs root. Run: sudo -E cargo xtask test");
        bail!("not root: privileged suite not run");
    }
    build()?;
    test_setup()?;
    // The package tests install and purge this very build's .deb.
    let package = deb::deb()?;
    let mut cmd = cargo();
    cmd.current_dir(root_dir())
        .env("EARLYTALKER_DEB", package)
        .args(["test", "--release", "--workspace", "--"])
        // Two lab tests at a time on two cores keeps timing honest.
        .args(["--test-threads", "2"])
        .args(extra)
        .env("EARLYTALKER_BIN", agent_bin())
        .env("EARLYTALKER_MTA_ROOT", deps::mta_root(&root_dir()));
    status(&mut cmd)
}
