//! Reading a peer's identity from its certificate: the DER comes from the
//! network (the verifier has checked the chain, but the parser runs on
//! whatever was sent), so any input is an error or an identity, never a
//! panic.
#![no_main]

use ferry::identity::peer_identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peer_identity(data);
});
