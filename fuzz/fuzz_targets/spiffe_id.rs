//! The SPIFFE ID parser takes peer-controlled text (a certificate's URI
//! SAN): it must never panic, and whatever it accepts must print back to an
//! ID that parses to the same value.
#![no_main]

use ferry::identity::SpiffeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = SpiffeId::parse(s) {
            let again = SpiffeId::parse(&id.to_string()).expect("a printed ID parses");
            assert_eq!(again.service, id.service);
            assert_eq!(again.trust_domain, id.trust_domain);
        }
    }
});
