//! Overlay datagrams arrive from anyone on the node's UDP port: probes,
//! reachability (dial-back) and binding-measurement messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pos_proto::overlay::Message;
use p2pos_proto::packet::classify;
use p2pos_proto::{keepalive, reach};

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    if let Ok(message) = Message::decode(data) {
        // Whatever decodes must encode back to the same bytes.
        assert_eq!(message.encode(), data);
    }
    if let Ok(message) = reach::Message::decode(data) {
        assert_eq!(message.encode(), data);
    }
    if let Ok(message) = keepalive::Message::decode(data) {
        assert_eq!(message.encode(), data);
    }
});
