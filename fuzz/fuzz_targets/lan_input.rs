//! What a node parses from its LAN and from peers about services: mDNS TXT
//! announcements and service-list frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pos_proto::lan::{decode_service_list, encode_service_list, Announcement};

fuzz_target!(|data: &[u8]| {
    // TXT strings: split the input at 0xff into key=value strings.
    let strings: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    let pairs: Vec<(&str, Option<&[u8]>)> = strings
        .iter()
        .filter_map(|s| {
            let (k, v) = match s.iter().position(|b| *b == b'=') {
                Some(i) => (&s[..i], Some(&s[i + 1..])),
                None => (*s, None),
            };
            std::str::from_utf8(k).ok().map(|k| (k, v))
        })
        .collect();
    if let Ok(a) = Announcement::parse(pairs) {
        let txt = a.txt();
        let again = Announcement::parse(txt.iter().map(|(k, v)| (k.as_str(), Some(v.as_bytes()))));
        assert_eq!(again.as_ref(), Ok(&a));
    }
    if let Ok(list) = decode_service_list(data) {
        assert_eq!(&encode_service_list(&list)[4..], data);
    }
});
