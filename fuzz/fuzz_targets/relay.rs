//! Circuit-setup frames come from peers in sessions; relayed packets and
//! path probes from anyone, to a relay's or a node's port.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use p2pos_proto::relay::{
    parse_relayed, relayed_header, Forward, PathMessage, RelayLimits, RelayMessage, RelayTable,
};
use p2pos_proto::Keypair;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = RelayMessage::decode(data) {
        assert_eq!(&msg.encode()[2..], data);
    }
    if let Ok(msg) = PathMessage::decode(data) {
        assert_eq!(msg.encode(), data);
    }
    if let Ok((circuit, payload)) = parse_relayed(data) {
        assert_eq!(&relayed_header(circuit)[..], &data[..data.len() - payload.len()]);
        // A relay forwards only between the ends of a circuit it opened.
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:2".parse().unwrap();
        let mut table = RelayTable::new(RelayLimits::default(), circuit, Duration::ZERO);
        let (pa, pb) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
        let open = table
            .open(Duration::ZERO, (pa.peer_id(), a), (pb.peer_id(), b))
            .unwrap();
        let verdict = table.forward(Duration::ZERO, a, circuit, data.len());
        assert!(circuit == open || verdict == Forward::Unknown);
    }
});
