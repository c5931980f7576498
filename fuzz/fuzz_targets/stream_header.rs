//! Stream headers and application datagrams come from peers in sessions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pos_proto::stream::{decode_datagram, StreamOpen, StreamReply};

fuzz_target!(|data: &[u8]| {
    if let Ok((open, used)) = StreamOpen::decode(data) {
        assert_eq!(open.encode(), &data[..used]);
    }
    if let Ok((reply, used)) = StreamReply::decode(data) {
        assert!(used <= data.len());
        let _ = reply.encode();
    }
    let _ = decode_datagram(data);
});
