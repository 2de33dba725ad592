//! `cargo xtask fuzz --count N`: differential fuzzing at length (see the fuzz
//! module). Prints the seed so any disagreement can be replayed.

fn main() {
    let mut count: u64 = 1_000_000;
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match (
            args[i].as_str(),
            args.get(i + 1).and_then(|v| v.parse().ok()),
        ) {
            ("--count", Some(v)) => count = v,
            ("--seed", Some(v)) => seed = v,
            _ => {
                eprintln!("usage: et-fuzz [--count N] [--seed S]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let object = earlytalker_tests::kernel_object();
    // Rounds of 10,000 packets per configuration, each with its own seed.
    let per = 10_000u64;
    let rounds = count
        .div_ceil(per * earlytalker_tests::fuzz::CONFIGS)
        .max(1);
    let t = std::time::Instant::now();
    let mut total = 0;
    for k in 0..rounds {
        match earlytalker_tests::fuzz::differential(object, seed + k, per) {
            Ok(c) => total += c.compared,
            Err(e) => {
                eprintln!(
                    "DISAGREEMENT (replay: --seed {} --count {}):\n{e:#}",
                    seed + k,
                    per * 4
                );
                std::process::exit(1);
            }
        }
    }
    println!(
        "{total} packets from seeds {seed}..{}: kernel programs and model agree ({:.0} packets/s)",
        seed + rounds - 1,
        total as f64 / t.elapsed().as_secs_f64()
    );
}
