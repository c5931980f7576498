//! DHT messages arrive from anyone on the node's UDP port.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use p2pos_proto::dht::DhtMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(DhtMessage::Response(r)) = DhtMessage::<SocketAddr>::decode(data) {
        // Whatever decodes re-encodes to the same bytes.
        assert_eq!(r.encode(), data);
    }
    let _ = DhtMessage::<u32>::decode(data);
});
