//! `LLMQ__SECTION__FIELD` from the real process environment. The only test in
//! this binary, so setting the variable races with nothing.

#[test]
fn process_env_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llmq.toml");
    std::fs::write(&path, "[queue]\nconcurrency = 100\n").unwrap();
    std::env::set_var("LLMQ__QUEUE__CONCURRENCY", "7");
    std::env::set_var("LLMQ__PROVIDERS__GROQ__LIMITS__RPM", "4");
    let cfg = llmq::config::load(Some(&path)).unwrap();
    assert_eq!(cfg.queue.concurrency, 7);
    assert_eq!(cfg.providers["groq"].limits.rpm, Some(4));
    assert_eq!(cfg.providers["groq"].limits.tpm, Some(6000));

    std::env::set_var("LLMQ__QUEUE__CONCURRENCY", "zero");
    let e = llmq::config::load(Some(&path)).unwrap_err().to_string();
    assert!(e.contains("LLMQ__QUEUE__CONCURRENCY"), "{e}");
    std::env::remove_var("LLMQ__QUEUE__CONCURRENCY");
    std::env::remove_var("LLMQ__PROVIDERS__GROQ__LIMITS__RPM");
}
