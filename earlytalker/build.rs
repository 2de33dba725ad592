//! Builds the kernel programs (../earlytalker-ebpf) with the nightly toolchain for
//! bpfel-unknown-none and hands the object to the agent through OUT_DIR.
//! `cargo xtask setup` installs what this needs (rust-src, bpf-linker).

use std::{env, path::PathBuf, process::Command};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../earlytalker-ebpf").canonicalize()?;
    for p in ["src", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    // The ABI crate the kernel programs are built with.
    let common = manifest.join("../earlytalker-common").canonicalize()?;
    for p in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", common.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=EARLYTALKER_BPF_OBJ");
    let out = PathBuf::from(env::var("OUT_DIR")?).join("earlytalker.bpf.o");

    // A prebuilt object (e.g. from a packaging pipeline) skips the nightly build.
    if let Ok(obj) = env::var("EARLYTALKER_BPF_OBJ") {
        std::fs::copy(&obj, &out)?;
        return Ok(());
    }

    // Shared with xtask so that one incremental kernel build serves every profile.
    let target_dir = manifest.join("../target/ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "--target-dir",
    ])
    .arg(&target_dir)
    .current_dir(&ebpf_dir);
    // The outer cargo's settings are for the host build, not for the BPF target.
    for (k, _) in env::vars() {
        if (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTDOC"
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run rustup: {e}; run `cargo xtask setup`"))?;
    if !status.success() {
        anyhow::bail!(
            "building the eBPF programs failed ({status}); `cargo xtask setup` installs the nightly rust-src and bpf-linker they need"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/earlytalker");
    std::fs::copy(&obj, &out)?;
    Ok(())
}
