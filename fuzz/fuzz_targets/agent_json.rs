//! Everything ferry decodes from the agent: a malformed or hostile answer is
//! an error, never a panic, and a decoded registration is derived into a
//! configuration (or refused) without panicking either.
#![no_main]

use ferry::control::agent::api::{CaRoots, IssuedCert, ServiceEntry};
use ferry::control::agent::{api::AgentService, registration::derive};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<CaRoots>(data);
    let _ = serde_json::from_slice::<IssuedCert>(data);
    let _ = serde_json::from_slice::<Vec<ServiceEntry>>(data);
    if let Ok(svc) = serde_json::from_slice::<AgentService>(data) {
        let _ = derive(&svc);
    }
});
