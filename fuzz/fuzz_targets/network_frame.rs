//! Private-network frames: every datagram of a private node passes here.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pos_proto::network::NetworkKey;

fuzz_target!(|data: &[u8]| {
    let key = NetworkKey::from_secret(b"fuzzing network secret 0123456789").expect("valid secret");
    if let Ok(inner) = key.open(data) {
        assert_eq!(key.seal(inner), data);
    }
});
