//! The dashboard in a real headless Chromium: key rows, badges, bars and
//! countdowns render from the API, the token prompt works, and the Reset
//! button POSTs `/v1/keys/{id}/reset`. Skips (with a message) when no
//! chromium binary is installed.

#[path = "support/chromium.rs"]
mod chromium;
#[path = "support/fake_admin.rs"]
mod fake_admin;

use std::time::Duration;

use chromium::{dump_dom, require_chromium, Browser};
use fake_admin::{key, serve_admin, FakeBackend, FAKE_SECRET};
use llmq::admin::KeyViewStatus;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_dom_shows_every_key_row() {
    let bin = require_chromium("dump_dom_shows_every_key_row");
    let fake = FakeBackend::new(vec![
        key("x#1", KeyViewStatus::Disabled),
        key("x#2", KeyViewStatus::Available),
    ]);
    let srv = serve_admin(fake, None).await;
    let dom = dump_dom(&bin, &format!("{}/", srv.base), 3000).await;
    assert!(
        dom.contains(r#"data-loaded="1""#),
        "the page never rendered data:\n{dom}"
    );
    assert!(
        dom.contains(r#"<tr data-key-id="x#1" data-status="disabled">"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<tr data-key-id="x#2" data-status="available">"#),
        "{dom}"
    );
    assert!(dom.contains(r#"data-reset="x#1""#), "{dom}");
    assert!(
        dom.contains("auth_failed: invalid API key"),
        "the reason is shown"
    );
    assert!(!dom.contains(FAKE_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_button_resets_a_disabled_key() {
    let bin = require_chromium("reset_button_resets_a_disabled_key");
    let token = "dash-token-123";
    let fake = FakeBackend::new(vec![
        key("x#1", KeyViewStatus::Disabled),
        key("x#2", KeyViewStatus::Cooling),
    ]);
    let srv = serve_admin(fake.clone(), Some(token)).await;
    let browser = Browser::launch(&bin).await;
    let mut page = browser.open(&format!("{}/", srv.base)).await;

    // Token configured: the page asks for it before showing any data.
    page.wait_for(
        "document.getElementById('auth') && !document.getElementById('auth').hidden",
        WAIT,
        "the token prompt",
    )
    .await;
    assert_eq!(
        page.eval("document.querySelectorAll('tr[data-key-id]').length")
            .await,
        0
    );
    page.eval(&format!(
        "document.getElementById('token').value = '{token}'"
    ))
    .await;
    page.click("#token-save").await;
    page.wait_for(
        r#"document.querySelector('tr[data-key-id="x#1"]')?.dataset.status === 'disabled'"#,
        WAIT,
        "the disabled key row",
    )
    .await;
    assert_eq!(
        page.eval("sessionStorage.getItem('llmq.admin.token')")
            .await,
        token
    );
    assert_eq!(
        page.eval("document.getElementById('auth').hidden").await,
        true
    );

    // Bars against the limits, the queue, a ticking cooldown.
    let rpm = page.eval(r#"(() => { const b = document.querySelector('tr[data-key-id="x#1"] [data-bar="rpm"]'); return [b.dataset.used, b.dataset.limit, b.querySelector('.fill').style.width]; })()"#).await;
    assert_eq!(rpm, serde_json::json!(["3", "30", "10%"]));
    assert_eq!(
        page.eval(r#"document.querySelector('[data-lane="normal"] [data-depth]').dataset.depth"#)
            .await,
        "7"
    );
    assert_eq!(
        page.eval("document.getElementById('q-dead').textContent")
            .await,
        "1"
    );
    let first = page
        .eval(r#"document.querySelector('tr[data-key-id="x#2"] [data-cooldown]').textContent"#)
        .await;
    assert!(
        first.as_str().unwrap().starts_with("1m "),
        "cooldown of 90 s shows as 1m …, got {first}"
    );
    page.wait_for(
        &format!(r#"document.querySelector('tr[data-key-id="x#2"] [data-cooldown]').textContent !== {first}"#),
        WAIT,
        "the cooldown to tick",
    )
    .await;

    // Reset is offered on disabled and cooling keys only after the click it is gone.
    assert_eq!(
        page.eval(r#"document.querySelector('button[data-reset="x#1"]').hidden"#)
            .await,
        false
    );
    page.click(r#"button[data-reset="x#1"]"#).await;
    llmq_testkit::wait_until_async(WAIT, "the backend to record the reset", || {
        let done = fake.resets() == vec!["x#1".to_owned()];
        async move { done }
    })
    .await;
    page.wait_for(
        r#"document.querySelector('tr[data-key-id="x#1"]').dataset.status === 'available' && document.querySelector('button[data-reset="x#1"]').hidden"#,
        WAIT,
        "the row to show the key available",
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('error').textContent")
            .await,
        Value::String(String::new())
    );
    let html = page.eval("document.documentElement.outerHTML").await;
    assert!(!html.as_str().unwrap().contains(FAKE_SECRET));
}
