//! Peer records come from the DHT (any node may have written them, though
//! signed), signalling frames from peers in sessions, punches from anyone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pos_proto::traversal::{decode_punch, encode_punch, PeerInfo, Signal};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = PeerInfo::decode(data) {
        assert_eq!(info.encode(), data);
    }
    if let Ok(signal) = Signal::decode(data) {
        assert_eq!(&signal.encode()[2..], data);
    }
    if let Ok(id) = decode_punch(data) {
        assert_eq!(encode_punch(id), data);
    }
});
