//! Peer IDs are typed and pasted by people and arrive through the API.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pos_proto::PeerId;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = text.parse::<PeerId>() {
            assert_eq!(id.to_string(), text.trim().to_ascii_lowercase());
        }
    }
    let _ = PeerId::from_spki_der(data);
});
