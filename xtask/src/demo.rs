//! The newcomer's first contact: two network namespaces, an SMTP responder, a
//! polite client and a bot, with the real agent (text log) between them.

use anyhow::{bail, Context, Result};
use earlytalker_tests::{bot_read_all, join, session, Lab, Manner, Responder};
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

pub fn run(agent: &Path) -> Result<()> {
    let lab = Lab::new().context("building the demo namespaces")?;
    println!(
        "demo: server namespace {} (SMTP responder on port 25, greets at once),",
        lab.server_ns
    );
    println!(
        "      client namespace {}, joined by veth {} <-> {}",
        lab.client_ns, lab.server_if, lab.client_if
    );
    let resp = Responder::start(&lab, 25, Duration::ZERO)?;

    println!(
        "demo: starting earlytalker -i {} --wait 1   (default action: denysoft)\n",
        lab.server_if
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns])
        .arg(agent)
        .args(["-i", &lab.server_if, "--wait", "1", "--pass-ttl", "0"])
        .arg("--state-dir")
        .arg(lab.state_dir())
        .arg("--control-socket")
        .arg(lab.control_socket())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the agent")?;
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().context("agent stdout")?;
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("  earlytalker | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = drive(&lab, &resp, &rx);
    // SIGINT: the agent detaches and prints its counters.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let end = Instant::now() + Duration::from_secs(5);
    while child.try_wait()?.is_none() && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    thread::sleep(Duration::from_millis(100));
    result?;
    println!("\ndemo: done; namespaces removed. Full test suite: sudo cargo xtask test");
    Ok(())
}

fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(15);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return Ok(()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    bail!("the agent did not report {what} within 15 s")
}

fn drive(lab: &Lab, resp: &Responder, rx: &mpsc::Receiver<String>) -> Result<()> {
    wait_line(rx, "its start", |l| l.contains(" STARTED "))?;
    let server = SocketAddr::new(lab.server_addr(false), 25);

    println!("\ndemo: a polite client connects and waits for the greeting...");
    let polite = join(lab.in_client(move || session(server, &Manner::Polite)))??;
    println!(
        "demo: polite client (port {}) got \"{}\" after {:.2} s, then said EHLO/QUIT",
        polite.local_port,
        polite.greeting.trim_end(),
        polite.greeting_after.as_secs_f64()
    );
    let p = format!(":{} ", polite.local_port);
    wait_line(rx, "the polite client", |l| {
        l.contains("PASS") && l.contains(&p)
    })?;

    println!("\ndemo: a bot connects and sends \"EHLO bot\" at once, without waiting...");
    let bot = b"EHLO bot\r\nMAIL FROM:<spam@example.net>\r\n";
    let run = join(lab.in_client(move || bot_read_all(server, bot, false)))??;
    println!(
        "demo: bot (port {}) talked first and received {:?}, then {} after {:.3} s",
        run.local_port,
        String::from_utf8_lossy(&run.received),
        run.end,
        run.elapsed.as_secs_f64()
    );
    let b = format!(":{} ", run.local_port);
    wait_line(rx, "the bot", |l| l.contains("PREGREET") && l.contains(&b))?;
    let delivered = resp.session(run.local_port).map_or(0, |s| s.received.len());
    println!(
        "\ndemo: caught and refused in the kernel; bytes of the bot's that reached the responder: {delivered}"
    );
    Ok(())
}
