//! Differential fuzzing of the loaded kernel programs against the reference
//! model (see earlytalker_tests::fuzz). A few thousand cases here; millions with
//! `cargo xtask fuzz --count N`. Needs root (BPF_PROG_TEST_RUN).

use earlytalker_tests::{fuzz, is_root, kernel_object};

#[test]
fn f1_kernel_programs_agree_with_the_model() {
    assert!(
        is_root(),
        "BPF_PROG_TEST_RUN needs root; run `cargo xtask test` as root"
    );
    let object = kernel_object();
    // A fixed seed for reproducibility, plus one that changes every run.
    let varying = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut pipeconnect = 0;
    for seed in [1, varying] {
        let c = fuzz::differential(object, seed, 1500).unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("seed {seed}: kernel and model agree: {c:?}");
        assert_eq!(c.compared + c.refused, 1500 * fuzz::CONFIGS);
        assert!(c.refused < 150 * fuzz::CONFIGS, "{c:?}");
        // The run reached every kind of outcome, not just the parse failures.
        assert!(
            c.dropped > 0 && c.early_events > 0 && c.verdict_events > 0 && c.closed_events > 0,
            "{c:?}"
        );
        pipeconnect += c.pipeconnect;
    }
    // A client that passed, back with an EHLO first: rarer, so over both seeds.
    assert!(pipeconnect > 0, "no PIPECONNECT case was reached");
}
