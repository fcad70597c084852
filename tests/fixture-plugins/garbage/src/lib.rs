//! A plugin whose answers are garbage: `prepare` returns bytes that are not
//! JSON with an OK status, `parse` returns JSON that is not an outcome.
//! Written against the raw vtable, as a careless third party might.

use llmq_sdk::abi::{self, PluginVTable, RawResult, ABI_MAJOR, ABI_MINOR, STATUS_OK};

extern "C" fn manifest() -> RawResult {
    let m =
        serde_json::json!({"name": "garbage", "version": "0.0.1", "protocols": ["openai-chat"]});
    RawResult {
        status: STATUS_OK,
        buf: abi::into_raw(m.to_string().into_bytes()),
    }
}

extern "C" fn prepare(_input: *const u8, _len: usize) -> RawResult {
    RawResult {
        status: STATUS_OK,
        buf: abi::into_raw(b"{\"method\": \"POST\", \"url\": ".to_vec()),
    }
}

extern "C" fn parse(_input: *const u8, _len: usize) -> RawResult {
    RawResult {
        status: STATUS_OK,
        buf: abi::into_raw(b"{\"outcome\": {\"kind\": \"bogus\"}}".to_vec()),
    }
}

static VTABLE: PluginVTable = PluginVTable {
    struct_size: std::mem::size_of::<PluginVTable>(),
    abi_major: ABI_MAJOR,
    abi_minor: ABI_MINOR,
    build_info: abi::BUILD_INFO.as_ptr() as *const std::os::raw::c_char,
    manifest,
    prepare,
    parse,
    free_bytes: abi::free_bytes,
};

// The exported entry symbol: the one `unsafe_code` item a plugin needs.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn llmq_plugin_entry() -> *const PluginVTable {
    &VTABLE
}
