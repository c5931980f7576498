//! DHT messages arrive from anyone on the node's UDP port.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use p2pos_proto::dht::{peek_ids, peek_response_txid, DhtMessage, RequestBody};

fuzz_target!(|data: &[u8]| {
    if let Ok(DhtMessage::Response(r)) = DhtMessage::<SocketAddr>::decode(data) {
        // Whatever decodes re-encodes to the same bytes.
        assert_eq!(r.encode(), data);
    }
    // The quick read of the IDs a datagram names (a cache hint) never
    // panics, and agrees with the decoder on what decodes.
    let peeked = peek_ids(data);
    match DhtMessage::<u32>::decode(data) {
        Ok(DhtMessage::Request(r)) => {
            assert_eq!(peeked[0], Some(r.sender));
            let target = match r.body {
                RequestBody::FindNode(t) | RequestBody::GetRecord(t) | RequestBody::FindPeer(t) => {
                    Some(t)
                }
                _ => None,
            };
            assert_eq!(peeked[1], target);
        }
        Ok(DhtMessage::Response(r)) => {
            assert_eq!(peeked, [Some(r.responder), None]);
            assert_eq!(peek_response_txid(data), Some(r.txid));
        }
        Ok(DhtMessage::Introduction(_)) => assert_eq!(peeked, [None, None]),
        Err(_) => {}
    }
});
