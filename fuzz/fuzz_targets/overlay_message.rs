//! Overlay datagrams arrive from anyone on the node's UDP port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pos_proto::overlay::Message;
use p2pos_proto::packet::classify;

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    if let Ok(message) = Message::decode(data) {
        // Whatever decodes must encode back to the same bytes.
        assert_eq!(message.encode(), data);
    }
});
