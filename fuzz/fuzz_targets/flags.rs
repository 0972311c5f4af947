//! The command line and the values of its own types (`-upstream`,
//! `-upstream-addr`, durations): never a panic, whatever the arguments.
//! Arguments are the input split at NUL bytes.
#![no_main]

use ferry::cli::{self, GoDuration, UpstreamAddrArg, UpstreamArg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = s.parse::<UpstreamArg>();
    let _ = s.parse::<UpstreamAddrArg>();
    if let Ok(d) = s.parse::<GoDuration>() {
        // What is printed parses back to the same duration.
        let shown = d.to_string();
        if let Ok(again) = shown.parse::<GoDuration>() {
            assert_eq!(again, d, "{s:?} printed as {shown:?}");
        }
    }
    let args = std::iter::once("ferry").chain(s.split('\0'));
    let _ = cli::parse(args);
});
