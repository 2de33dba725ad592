//! `cargo xtask deb`: the Debian package a relay operator installs, built on the
//! build host (the only place with a toolchain) with Debian's own tools:
//! `dpkg-shlibdeps` for the exact library dependencies and `dpkg-deb` for the
//! archive. (cargo-deb does the same staging, but CI would compile it from source
//! on every clean run, several minutes on two cores; dpkg-deb is on every
//! Debian host.) The result is checked with lintian by the test suite.

use crate::{agent_bin, build, deps, root_dir, status};
use anyhow::{bail, Context, Result};
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

pub const PACKAGE: &str = "earlytalker";
const VERSION: &str = env!("CARGO_PKG_VERSION");
const UNIT: &str = "lib/systemd/system/earlytalker.service";

/// Files the package installs besides the binary: (source under
/// earlytalker/dist or target/dist, destination, mode).
const FILES: &[(&str, &str, u32)] = &[
    (
        "dist:earlytalker.toml",
        "etc/earlytalker/earlytalker.toml",
        0o644,
    ),
    (
        "dist:fail2ban/earlytalker.conf",
        "etc/fail2ban/filter.d/earlytalker.conf",
        0o644,
    ),
    (
        "dist:fail2ban/jail.conf",
        "usr/share/doc/earlytalker/examples/fail2ban-jail.conf",
        0o644,
    ),
    (
        "dist:grafana/earlytalker-dashboard.json",
        "usr/share/earlytalker/grafana-dashboard.json",
        0o644,
    ),
    (
        "gen:earlytalker.bash",
        "usr/share/bash-completion/completions/earlytalker",
        0o644,
    ),
    (
        "gen:_earlytalker",
        "usr/share/zsh/vendor-completions/_earlytalker",
        0o644,
    ),
    (
        "gen:earlytalker.fish",
        "usr/share/fish/vendor_completions.d/earlytalker.fish",
        0o644,
    ),
    (
        "dist:debian/copyright",
        "usr/share/doc/earlytalker/copyright",
        0o644,
    ),
];

/// Configuration files the operator edits: kept across upgrades, removed on purge.
const CONFFILES: &[&str] = &[
    "/etc/earlytalker/earlytalker.toml",
    "/etc/fail2ban/filter.d/earlytalker.conf",
];

/// Builds target/debian/earlytalker_VERSION_ARCH.deb; returns its path.
pub fn deb() -> Result<PathBuf> {
    for (tool, pkg) in [("dpkg-shlibdeps", "dpkg-dev"), ("strip", "binutils")] {
        if !on_path(tool) {
            deps::apt_install(&[pkg.to_string()])?;
        }
    }
    build()?;
    let root = root_dir();
    let dist = root.join("earlytalker/dist");
    let gen = root.join("target/dist");
    status(Command::new(agent_bin()).arg("generate").arg(&gen))?;
    let out = root.join("target/debian");
    let stage = out.join("stage");
    if stage.exists() {
        std::fs::remove_dir_all(&stage).context("clearing the staging tree")?;
    }
    let arch = crate::output("dpkg", &["--print-architecture"])
        .context("dpkg --print-architecture")?
        .trim()
        .to_string();

    let sbin = stage.join("usr/sbin/earlytalker");
    put_bytes(&sbin, &std::fs::read(agent_bin())?, 0o755)?;
    status(Command::new("strip").arg("--strip-unneeded").arg(&sbin))?;
    for (from, to, mode) in FILES {
        let src = match from.split_once(':') {
            Some(("dist", p)) => dist.join(p),
            Some(("gen", p)) => gen.join(p),
            _ => bail!("bad source {from}"),
        };
        put_bytes(
            &stage.join(to),
            &std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?,
            *mode,
        )?;
    }
    // The unit as shipped for `cargo xtask install`, with the package's path.
    let unit = std::fs::read_to_string(dist.join("earlytalker.service"))?
        .replace("/usr/local/sbin/earlytalker", "/usr/sbin/earlytalker");
    put_bytes(&stage.join(UNIT), unit.as_bytes(), 0o644)?;
    gzip_into(
        &gen.join("earlytalker.8"),
        &stage.join("usr/share/man/man8/earlytalker.8.gz"),
    )?;
    gzip_into(
        &dist.join("debian/changelog"),
        &stage.join("usr/share/doc/earlytalker/changelog.gz"),
    )?;

    let control = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        put_bytes(
            &control.join(script),
            &std::fs::read(dist.join("debian").join(script))?,
            0o755,
        )?;
    }
    put_bytes(
        &control.join("conffiles"),
        format!("{}\n", CONFFILES.join("\n")).as_bytes(),
        0o644,
    )?;
    put_bytes(&control.join("md5sums"), md5sums(&stage)?.as_bytes(), 0o644)?;
    let fields = Fields {
        arch: &arch,
        depends: &shlib_depends(&out, &sbin)?,
        installed_kib: installed_kib(&stage)?,
    };
    put_bytes(&control.join("control"), fields.render().as_bytes(), 0o644)?;

    let deb = out.join(format!("{PACKAGE}_{VERSION}_{arch}.deb"));
    status(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("built {}", deb.display());
    Ok(deb)
}

struct Fields<'a> {
    arch: &'a str,
    depends: &'a str,
    installed_kib: u64,
}

impl Fields<'_> {
    fn render(&self) -> String {
        format!(
            "Package: {PACKAGE}
Version: {VERSION}
Architecture: {arch}
Maintainer: earlytalker developers <earlytalker@example.org>
Installed-Size: {size}
Depends: {depends}
Suggests: fail2ban, prometheus
Section: mail
Priority: optional
Homepage: https://example.org/earlytalker
Description: SMTP early-talker guard in the kernel, in front of any MTA
 earlytalker holds each new SMTP connection for a few seconds in the
 kernel (eBPF TC programs), before the mail server can accept it, and
 catches clients that talk before the greeting, as direct-to-MX spam bots
 do: like Postfix's postscreen pregreet test, but in front of any
 unmodified MTA (Postfix, Exim, OpenSMTPD, Sendmail).
 .
 The shipped configuration only logs; set action = \"deny\" or
 \"denysoft\" in /etc/earlytalker/earlytalker.toml to refuse. Needs
 Linux 6.6 or later with BTF (TCX links); if the agent stops, mail flows
 unwatched. Includes a fail2ban filter and a Grafana dashboard.
",
            arch = self.arch,
            size = self.installed_kib,
            depends = self.depends,
        )
    }
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn put_bytes(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    std::fs::create_dir_all(to.parent().context("absolute path")?)?;
    std::fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// gzip -9n: no name or time stamp in the header, as Debian policy asks.
fn gzip_into(from: &Path, to: &Path) -> Result<()> {
    let out = Command::new("gzip")
        .args(["-9nc"])
        .arg(from)
        .output()
        .context("running gzip")?;
    if !out.status.success() {
        bail!("gzip {} failed", from.display());
    }
    put_bytes(to, &out.stdout, 0o644)
}

/// The binary's exact library dependencies, from the libraries' own
/// shlibs/symbols files (dpkg-shlibdeps wants a debian/control to read).
fn shlib_depends(out: &Path, binary: &Path) -> Result<String> {
    let work = out.join("shlibdeps");
    put_bytes(
        &work.join("debian/control"),
        format!(
            "Source: {PACKAGE}\nMaintainer: earlytalker developers <earlytalker@example.org>\n\nPackage: {PACKAGE}\nArchitecture: any\nDescription: earlytalker\n"
        )
        .as_bytes(),
        0o644,
    )?;
    let o = Command::new("dpkg-shlibdeps")
        .args(["-O", "-e"])
        .arg(binary)
        .current_dir(&work)
        .output()
        .context("running dpkg-shlibdeps")?;
    if !o.status.success() {
        bail!(
            "dpkg-shlibdeps failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let deps = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps gave no shlibs:Depends")?;
    Ok(deps.trim().to_string())
}

/// Every file under the tree but DEBIAN/, as dpkg's md5sums lists them.
fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    walk(stage, &mut files)?;
    files.sort();
    let mut out = String::new();
    for f in files {
        let rel = f.strip_prefix(stage)?.to_string_lossy().to_string();
        if rel.starts_with("DEBIAN/") {
            continue;
        }
        let o = Command::new("md5sum").arg(&f).output()?;
        let text = String::from_utf8_lossy(&o.stdout);
        let sum = text.split_whitespace().next().context("md5sum output")?;
        out.push_str(&format!("{sum}  {rel}\n"));
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Installed-Size in KiB, as dpkg-gencontrol computes it (per file, rounded up).
fn installed_kib(stage: &Path) -> Result<u64> {
    let mut files = Vec::new();
    walk(stage, &mut files)?;
    let mut kib = 0;
    for f in files {
        if f.strip_prefix(stage)?.starts_with("DEBIAN") {
            continue;
        }
        kib += std::fs::metadata(&f)?.len().div_ceil(1024);
    }
    Ok(kib)
}
