//! Each first-party plugin's rlib exports the same C entry point,
//! `llmq_plugin_entry` (from `llmq_sdk::export_plugin!`), because the same
//! crate is also the plugin's cdylib. The fuzz binary links all three rlibs
//! to call their `Plugin` impls directly and never calls the entry point, so
//! the duplicate definitions are harmless: let the linker keep the first.
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        println!("cargo:rustc-link-arg-tests=-Wl,--allow-multiple-definition");
    }
}
