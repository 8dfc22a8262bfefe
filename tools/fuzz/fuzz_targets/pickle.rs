//! Arbitrary bytes → `fastdet::pickle::unpickle`: must return Ok or Err, never panic, hang or
//! allocate more than the input justifies.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fastdet::pickle::unpickle(data);
});
