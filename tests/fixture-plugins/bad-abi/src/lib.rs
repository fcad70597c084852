//! A plugin built for an ABI major version this daemon does not speak.
//! The host must refuse it at load, naming the file.

use llmq_sdk::abi::{self, PluginVTable, RawResult, ABI_MINOR, STATUS_OK};

extern "C" fn manifest() -> RawResult {
    RawResult {
        status: STATUS_OK,
        buf: abi::into_raw(br#"{"name":"bad-abi","version":"0.0.1","protocols":["x"]}"#.to_vec()),
    }
}

extern "C" fn call(_input: *const u8, _len: usize) -> RawResult {
    manifest()
}

static VTABLE: PluginVTable = PluginVTable {
    struct_size: std::mem::size_of::<PluginVTable>(),
    abi_major: 99,
    abi_minor: ABI_MINOR,
    build_info: abi::BUILD_INFO.as_ptr() as *const std::os::raw::c_char,
    manifest,
    prepare: call,
    parse: call,
    free_bytes: abi::free_bytes,
};

// The exported entry symbol: the one `unsafe_code` item a plugin needs.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn llmq_plugin_entry() -> *const PluginVTable {
    &VTABLE
}
