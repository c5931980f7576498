//! Sessions between in-process nodes on loopback.

use std::time::Duration;

use p2pos_node::{NetworkKey, Node};

async fn node(listen: &str) -> Node {
    Node::builder()
        .listen(listen.parse().unwrap())
        .spawn()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_leave_exactly_one_session() {
    for round in 0..20 {
        let a = node("127.0.0.1:0").await;
        let b = node("127.0.0.1:0").await;
        let (ra, rb) = tokio::join!(
            a.connect(b.peer_id(), Some(b.local_addr())),
            b.connect(a.peer_id(), Some(a.local_addr()))
        );
        ra.unwrap();
        rb.unwrap();
        // Streams work right away, whichever twin each side held first.
        let (pa, pb) = tokio::join!(a.ping(b.peer_id(), None, 1), b.ping(a.peer_id(), None, 1));
        pa.unwrap();
        pb.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (sa, sb) = (a.status(), b.status());
        assert_eq!(sa.sessions.len(), 1, "round {round}: {:?}", sa.sessions);
        assert_eq!(sb.sessions.len(), 1, "round {round}: {:?}", sb.sessions);
        // Both ends kept the same session: one dialed it, the other accepted.
        assert_ne!(
            sa.sessions[0].direction, sb.sessions[0].direction,
            "round {round}"
        );
        a.shutdown().await;
        b.shutdown().await;
    }
}

#[tokio::test]
async fn ipv6_and_dual_stack() {
    let Ok(v6) = Node::builder()
        .listen("[::1]:0".parse().unwrap())
        .spawn()
        .await
    else {
        eprintln!("SKIPPED ipv6_and_dual_stack: no IPv6 loopback on this host");
        return;
    };
    let dual = node("[::]:0").await;
    let v4 = node("127.0.0.1:0").await;
    // IPv6 session.
    dual.ping(v6.peer_id(), Some(v6.local_addr()), 1)
        .await
        .unwrap();
    // The same dual-stack socket reaches an IPv4 node and is reached over IPv4.
    dual.ping(v4.peer_id(), Some(v4.local_addr()), 1)
        .await
        .unwrap();
    let v4_addr = format!("127.0.0.1:{}", dual.local_addr().port())
        .parse()
        .unwrap();
    let fresh = node("127.0.0.1:0").await;
    fresh.ping(dual.peer_id(), Some(v4_addr), 1).await.unwrap();
    let remote = &fresh.status().sessions[0].remote_addr;
    assert_eq!(remote, &v4_addr.to_string());
    let v6_session = dual
        .status()
        .sessions
        .into_iter()
        .find(|s| s.peer == v6.peer_id().to_string())
        .unwrap();
    assert!(
        v6_session.remote_addr.starts_with("[::1]"),
        "{}",
        v6_session.remote_addr
    );
    assert_eq!(v6_session.path, "lan");
}

#[tokio::test]
async fn datagrams_reach_the_service() {
    let a = node("127.0.0.1:0").await;
    let b = node("127.0.0.1:0").await;
    let mut svc = b.listen("game", "positions").unwrap();
    a.send_datagram(b.peer_id(), "game", b"x=1", Some(b.local_addr()))
        .await
        .unwrap();
    let (from, data) = tokio::time::timeout(Duration::from_secs(5), svc.recv_datagram())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, a.peer_id());
    assert_eq!(&data[..], b"x=1");
    // Too large is an error, not a silent drop.
    let big = vec![0u8; 70_000];
    assert!(a
        .send_datagram(b.peer_id(), "game", &big, None)
        .await
        .is_err());
}

#[tokio::test]
async fn services_are_unregistered_when_dropped_and_names_checked() {
    let a = node("127.0.0.1:0").await;
    let b = node("127.0.0.1:0").await;
    let svc = b.listen("chat", "").unwrap();
    assert!(b.listen("chat", "").is_err());
    assert!(b.listen("p2pos/ping", "").is_err());
    assert!(b.listen("Has Space", "").is_err());
    drop(svc);
    let err = a
        .open_stream(b.peer_id(), "chat", Some(b.local_addr()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no such service"), "{err}");
    let _again = b.listen("chat", "").unwrap();
}

#[tokio::test]
async fn half_close_is_passed_on() {
    let a = node("127.0.0.1:0").await;
    let b = node("127.0.0.1:0").await;
    let mut svc = b.listen("upper", "").unwrap();
    tokio::spawn(async move {
        let incoming = svc.accept().await.unwrap();
        let mut s = incoming.accept().await.unwrap();
        // Read until the peer half-closes, then answer.
        let data = s.recv.read_to_end(1 << 20).await.unwrap();
        s.send.write_all(&data.to_ascii_uppercase()).await.unwrap();
        s.send.finish().unwrap();
        let _ = s.send.stopped().await;
    });
    let mut s = a
        .open_stream(b.peer_id(), "upper", Some(b.local_addr()))
        .await
        .unwrap();
    s.send.write_all(b"hello").await.unwrap();
    s.send.finish().unwrap();
    let back = s.recv.read_to_end(1 << 20).await.unwrap();
    assert_eq!(back, b"HELLO");
}

#[tokio::test]
async fn private_network_nodes_talk_only_to_each_other() {
    let key = NetworkKey::from_secret(b"a secret shared by the two nodes").unwrap();
    let p1 = Node::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .network(key.clone())
        .spawn()
        .await
        .unwrap();
    let p2 = Node::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .network(key)
        .spawn()
        .await
        .unwrap();
    p1.ping(p2.peer_id(), Some(p2.local_addr()), 2)
        .await
        .unwrap();
    // Large transfers work through the framing (no segmentation offload).
    let mut svc = p2.listen("bulk", "").unwrap();
    tokio::spawn(async move {
        let mut s = svc.accept().await.unwrap().accept().await.unwrap();
        let n = s.recv.read_to_end(8 << 20).await.unwrap().len();
        s.send.write_all(&(n as u64).to_be_bytes()).await.unwrap();
        s.send.finish().unwrap();
        let _ = s.send.stopped().await;
    });
    let mut s = p1.open_stream(p2.peer_id(), "bulk", None).await.unwrap();
    s.send.write_all(&vec![7u8; 4 << 20]).await.unwrap();
    s.send.finish().unwrap();
    let n = s.recv.read_to_end(8).await.unwrap();
    assert_eq!(u64::from_be_bytes(n.try_into().unwrap()), 4 << 20);
}
