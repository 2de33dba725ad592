//! What each command installs, and how, safely on a mail relay.
//!
//! Debian's MTAs all provide and conflict on `mail-transport-agent`: installing
//! one removes the operator's. So nothing here ever installs a package that
//! provides it, and every `apt-get install` is simulated first and refused if apt
//! would remove anything. The MTAs the test suite runs are private copies
//! unpacked from Debian's packages into the build tree (`target/mta/<name>`),
//! with only their libraries installed on the host.

use anyhow::{bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// What `build` (and so `run` and `install`) needs besides the nightly toolchain's
/// components; the LLVM major comes from the nightly rustc.
pub fn build_packages(llvm_major: u32) -> Vec<String> {
    vec![
        format!("llvm-{llvm_major}-dev"),
        format!("libpolly-{llvm_major}-dev"),
    ]
}

/// What the test suite runs besides the MTAs: namespaces (iproute2), real SMTP
/// clients (swaks, msmtp, curl, Python's smtplib), systemd-analyze for the
/// shipped unit, and m4 (Sendmail's configuration is built with it).
pub const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "swaks",
    "msmtp",
    "curl",
    "python3",
    "systemd",
    "m4",
    "nftables",
    "lintian",
    "fail2ban",
    "redis-server",
];

/// An MTA the suite runs from a private copy.
pub struct PrivateMta {
    /// Its directory under target/mta.
    pub dir: &'static str,
    /// Debian packages unpacked into it, in order.
    pub packages: &'static [&'static str],
    /// The file that proves the copy is unpacked.
    pub marker: &'static str,
}

pub const PRIVATE_MTAS: &[PrivateMta] = &[
    PrivateMta {
        dir: "postfix",
        packages: &["postfix"],
        marker: "usr/sbin/postfix",
    },
    PrivateMta {
        dir: "exim",
        packages: &["exim4-daemon-light"],
        marker: "usr/sbin/exim4",
    },
    PrivateMta {
        dir: "opensmtpd",
        packages: &["opensmtpd"],
        marker: "usr/sbin/smtpd",
    },
    PrivateMta {
        dir: "sendmail",
        packages: &["sendmail-bin", "sendmail-base", "sendmail-cf"],
        marker: "usr/libexec/sendmail/sendmail",
    },
];

/// A refusal that leaves the machine untouched: xtask exits 2 on it.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let o = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !o.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

pub fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Packages an `apt-get -s install` transcript would install and remove.
pub fn simulated(transcript: &str) -> (Vec<String>, Vec<String>) {
    let (mut inst, mut remv) = (Vec::new(), Vec::new());
    for l in transcript.lines() {
        let mut w = l.split_whitespace();
        match (w.next(), w.next()) {
            (Some("Inst"), Some(p)) => inst.push(p.to_string()),
            (Some("Remv"), Some(p)) => remv.push(p.to_string()),
            _ => {}
        }
    }
    (inst, remv)
}

/// Whether an `apt-cache show` record provides a mail transport agent.
pub fn provides_mta(record: &str) -> bool {
    record
        .lines()
        .filter_map(|l| l.strip_prefix("Provides:"))
        .flat_map(|l| l.split(','))
        .any(|p| p.split_whitespace().next() == Some("mail-transport-agent"))
}

fn apt_updated() -> Result<()> {
    // Once per xtask run: a fresh machine has no package lists at all.
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if DONE.get().is_none() {
        output(Command::new("apt-get").args(["update", "-qq"]))?;
        let _ = DONE.set(());
    }
    Ok(())
}

/// Installs the missing ones of `pkgs`, after a simulation shows that apt would
/// remove nothing and install no MTA. Root on Debian only.
pub fn apt_install(pkgs: &[String]) -> Result<()> {
    let missing: Vec<&String> = pkgs.iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_updated()?;
    let sim = output(
        Command::new("apt-get")
            .args(["install", "-s", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let (inst, remv) = simulated(&sim);
    if !remv.is_empty() {
        return Err(Refused(format!(
            "refusing to install {}: apt would remove {}",
            join(&missing),
            remv.join(", ")
        ))
        .into());
    }
    for p in &inst {
        let rec = output(Command::new("apt-cache").args(["show", "--no-all-versions", p]))?;
        if provides_mta(&rec) {
            return Err(Refused(format!(
                "refusing to install {}: it would bring {p}, a mail transport agent (Debian's MTAs replace one another)",
                join(&missing)
            ))
            .into());
        }
    }
    println!("installing {}", join(&missing));
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !st.success() {
        bail!("apt-get install {} failed ({st})", join(&missing));
    }
    Ok(())
}

fn join(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
}

/// The shared libraries a package depends on (first alternative of each Depends
/// entry that names a library), read from its .deb.
pub fn library_depends(deb: &Path) -> Result<Vec<String>> {
    let dep = output(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"))?;
    Ok(dep
        .split(',')
        .filter_map(|alt| alt.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .filter(|name| name.starts_with("lib"))
        .map(str::to_string)
        .collect())
}

/// Where the private MTA copies live: `target/mta/<package>`.
pub fn mta_root(root: &Path) -> PathBuf {
    root.join("target/mta")
}

/// Unpacks each MTA of the suite into `target/mta/<package>` (download and
/// `dpkg -x`, never `apt-get install`) and installs only its libraries.
pub fn private_mtas(root: &Path) -> Result<()> {
    let base = mta_root(root);
    let debs = base.join("debs");
    std::fs::create_dir_all(&debs)?;
    for mta in PRIVATE_MTAS {
        let dest = base.join(mta.dir);
        let complete = dest.join(mta.marker).exists();
        if !complete {
            let _ = std::fs::remove_dir_all(&dest);
        }
        for pkg in mta.packages {
            let deb = match find_deb(&debs, pkg) {
                Some(d) => d,
                None => {
                    apt_updated()?;
                    output(
                        Command::new("apt-get")
                            .args(["download", "-qq", pkg])
                            .current_dir(&debs),
                    )?;
                    find_deb(&debs, pkg)
                        .with_context(|| format!("apt-get download {pkg} left no .deb"))?
                }
            };
            apt_install(&library_depends(&deb)?)?;
            if !complete {
                output(Command::new("dpkg").arg("-x").arg(&deb).arg(&dest))?;
            }
        }
        if !complete {
            println!("unpacked a private {} into {}", mta.dir, dest.display());
        }
    }
    Ok(())
}

fn find_deb(dir: &Path, pkg: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_lists_installs_and_removals() {
        let t = "NOTE: This is only a simulation!\n\
                 Remv exim4-daemon-light [4.96-15+deb12u7]\n\
                 Inst postfix (3.7.11-0+deb12u1 Debian:12.12/stable [amd64])\n\
                 Conf postfix (3.7.11-0+deb12u1 Debian:12.12/stable [amd64])\n";
        let (inst, remv) = simulated(t);
        assert_eq!(inst, vec!["postfix"]);
        assert_eq!(remv, vec!["exim4-daemon-light"]);
    }

    #[test]
    fn mta_providers_are_recognised() {
        assert!(provides_mta(
            "Package: postfix\nProvides: default-mta, mail-transport-agent\n"
        ));
        assert!(provides_mta(
            "Package: exim4-daemon-light\nProvides: mail-transport-agent, exim4-localscanapi-6.0\n"
        ));
        assert!(!provides_mta("Package: swaks\nDepends: perl\n"));
        assert!(!provides_mta(
            "Package: x\nProvides: mail-transport-agent-doc\n"
        ));
    }

    /// The guard itself, against apt's real answer: asked for Postfix, it
    /// refuses before installing anything (apt only simulates). Needs root on
    /// Debian with package lists; elsewhere there is nothing to guard.
    #[test]
    fn asked_for_an_mta_it_refuses_and_installs_nothing() {
        if !nix::unistd::Uid::effective().is_root()
            || !Path::new("/etc/debian_version").exists()
            || installed("postfix")
        {
            return;
        }
        let e = apt_install(&["postfix".to_string()]).unwrap_err();
        assert!(e.downcast_ref::<Refused>().is_some(), "{e:#}");
        assert!(e.to_string().contains("postfix"), "{e}");
        assert!(!installed("postfix"));
    }

    #[test]
    fn no_command_names_an_mta_package() {
        for p in TEST_PACKAGES {
            assert!(!PRIVATE_MTAS.iter().any(|m| m.packages.contains(p)), "{p}");
        }
        assert!(build_packages(22)
            .iter()
            .all(|p| p.contains("llvm") || p.contains("polly")));
    }
}
