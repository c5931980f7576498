//! What a node tells its LAN, and what it tells peers about its services.
//!
//! **LAN announcements.** Each node announces the DNS-SD service
//! [`SERVICE_TYPE`] over mDNS; its instance name is its peer ID, the SRV
//! record carries its UDP port, and its TXT record carries:
//!
//! ```text
//! v=1             announcement version
//! id=<peer id>    the 55-character peer ID (the instance name may be
//!                 renamed by mDNS conflict resolution; this may not)
//! net=<16 hex>    only in private networks: NetworkKey::lan_tag(peer id)
//! ```
//!
//! A node of the public network announces no `net`; a member of a private
//! network announces a tag only members can compute, different for every
//! member, so the LAN learns neither the network's name nor its id, nor
//! which announcements belong together.
//!
//! **Service lists.** Inside a session, the built-in stream service
//! `p2pos/services` carries the services a node shows to that peer. The
//! node writes one frame at once and another whenever the list changes:
//!
//! ```text
//! frame:   length (4, big endian, ≤ MAX_SERVICE_LIST_FRAME) | body
//! body:    version (1) = 1 | count (2) | count × entry
//! entry:   name length (1) | name | description length (2) | description (UTF-8)
//! ```

use crate::network::NetworkKey;
use crate::stream::{read_service_name, HeaderError, ServiceNameError};
use crate::PeerId;

/// The DNS-SD service type of p2pos nodes.
pub const SERVICE_TYPE: &str = "_p2pos._udp.local.";
/// Version of the announcement's TXT record.
pub const ANNOUNCEMENT_VERSION: &str = "1";
/// Longest service description, in bytes.
pub const MAX_DESCRIPTION: usize = 200;
/// Most services in one list.
pub const MAX_SERVICES: usize = 256;
/// Largest service-list frame body.
pub const MAX_SERVICE_LIST_FRAME: usize = 1 + 2 + MAX_SERVICES * (1 + 64 + 2 + MAX_DESCRIPTION);
/// Version of the service-list frame.
pub const SERVICE_LIST_VERSION: u8 = 1;

/// A node's LAN announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Who announces.
    pub peer: PeerId,
    /// `None` in the public network; the announcer's LAN tag in a private one.
    pub network_tag: Option<[u8; 8]>,
}

/// Why a TXT record is not a p2pos announcement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    /// No `v` key, or a version this node does not speak.
    #[error("unsupported announcement version {0:?}")]
    Version(Option<String>),
    /// No `id` key, or not a valid peer ID.
    #[error("missing or invalid peer id")]
    PeerId,
    /// A `net` value that is not 16 hex digits.
    #[error("invalid network tag")]
    NetworkTag,
}

impl Announcement {
    /// The announcement of `peer` in `network` (`None`: the public one).
    pub fn new(peer: PeerId, network: Option<&NetworkKey>) -> Self {
        Announcement {
            peer,
            network_tag: network.map(|k| k.lan_tag(&peer)),
        }
    }

    /// The TXT key/value pairs.
    pub fn txt(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("v".to_owned(), ANNOUNCEMENT_VERSION.to_owned()),
            ("id".to_owned(), self.peer.to_string()),
        ];
        if let Some(tag) = self.network_tag {
            let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
            out.push(("net".to_owned(), hex));
        }
        out
    }

    /// Parses TXT key/value pairs (a key without `=` has value `None`).
    /// Unknown keys are ignored so later versions can add some.
    pub fn parse<'a>(
        txt: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Self, AnnouncementError> {
        let (mut version, mut id, mut net) = (None, None, None);
        for (key, value) in txt {
            // DNS-SD keys are case-insensitive; the first occurrence counts.
            let slot = match key.to_ascii_lowercase().as_str() {
                "v" => &mut version,
                "id" => &mut id,
                "net" => &mut net,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value.unwrap_or_default());
            }
        }
        match version {
            Some(v) if v == ANNOUNCEMENT_VERSION.as_bytes() => {}
            other => {
                return Err(AnnouncementError::Version(
                    other.map(|v| String::from_utf8_lossy(v).into_owned()),
                ))
            }
        }
        let peer = id
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse::<PeerId>().ok())
            .ok_or(AnnouncementError::PeerId)?;
        let network_tag = net.map(parse_tag).transpose()?;
        Ok(Announcement { peer, network_tag })
    }

    /// Whether the announcer is in `network` (`None`: the public network).
    pub fn is_in(&self, network: Option<&NetworkKey>) -> bool {
        match (network, self.network_tag) {
            (None, None) => true,
            (Some(key), Some(tag)) => key.lan_tag(&self.peer) == tag,
            _ => false,
        }
    }
}

fn parse_tag(value: &[u8]) -> Result<[u8; 8], AnnouncementError> {
    if value.len() != 16 {
        return Err(AnnouncementError::NetworkTag);
    }
    let mut tag = [0u8; 8];
    for (i, pair) in value.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| AnnouncementError::NetworkTag)?;
        tag[i] = u8::from_str_radix(s, 16).map_err(|_| AnnouncementError::NetworkTag)?;
    }
    Ok(tag)
}

/// One service as a peer shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceAd {
    /// Its name (a valid service name).
    pub name: String,
    /// A short description (≤ [`MAX_DESCRIPTION`] bytes).
    pub description: String,
}

/// Why a service list is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceListError {
    /// The frame ends early.
    #[error("service list is truncated")]
    Truncated,
    /// Bytes after the last entry.
    #[error("service list has trailing bytes")]
    Trailing,
    /// A version this node does not speak.
    #[error("unsupported service list version {0}")]
    Version(u8),
    /// More than [`MAX_SERVICES`] entries, or a frame over
    /// [`MAX_SERVICE_LIST_FRAME`] bytes.
    #[error("service list too large")]
    TooLarge,
    /// An invalid service name.
    #[error("invalid service name: {0}")]
    Name(ServiceNameError),
    /// A description that is too long or not UTF-8.
    #[error("invalid service description")]
    Description,
}

impl From<HeaderError> for ServiceListError {
    fn from(e: HeaderError) -> Self {
        match e {
            HeaderError::Name(n) => ServiceListError::Name(n),
            _ => ServiceListError::Truncated,
        }
    }
}

/// Encodes a service-list frame (length prefix included). Descriptions
/// longer than [`MAX_DESCRIPTION`] are cut at a character boundary and
/// entries past [`MAX_SERVICES`] dropped, so the frame always decodes.
pub fn encode_service_list(services: &[ServiceAd]) -> Vec<u8> {
    let services = &services[..services.len().min(MAX_SERVICES)];
    let mut body = vec![SERVICE_LIST_VERSION];
    body.extend_from_slice(&(services.len() as u16).to_be_bytes());
    for s in services {
        let name = &s.name.as_bytes()[..s.name.len().min(64)];
        body.push(name.len() as u8);
        body.extend_from_slice(name);
        let description = truncate_utf8(&s.description, MAX_DESCRIPTION);
        body.extend_from_slice(&(description.len() as u16).to_be_bytes());
        body.extend_from_slice(description.as_bytes());
    }
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads a frame's length prefix: the body length, if acceptable.
pub fn service_list_frame_len(prefix: [u8; 4]) -> Result<usize, ServiceListError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_SERVICE_LIST_FRAME {
        return Err(ServiceListError::TooLarge);
    }
    Ok(len)
}

/// Decodes a service-list frame body (after the length prefix).
pub fn decode_service_list(body: &[u8]) -> Result<Vec<ServiceAd>, ServiceListError> {
    if body.len() > MAX_SERVICE_LIST_FRAME {
        return Err(ServiceListError::TooLarge);
    }
    let (&version, rest) = body.split_first().ok_or(ServiceListError::Truncated)?;
    if version != SERVICE_LIST_VERSION {
        return Err(ServiceListError::Version(version));
    }
    let count = rest.get(..2).ok_or(ServiceListError::Truncated)?;
    let count = usize::from(u16::from_be_bytes([count[0], count[1]]));
    if count > MAX_SERVICES {
        return Err(ServiceListError::TooLarge);
    }
    let mut rest = &rest[2..];
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let (name, after) = read_service_name(rest)?;
        let len = after.get(..2).ok_or(ServiceListError::Truncated)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len > MAX_DESCRIPTION {
            return Err(ServiceListError::Description);
        }
        let description = after.get(2..2 + len).ok_or(ServiceListError::Truncated)?;
        let description =
            std::str::from_utf8(description).map_err(|_| ServiceListError::Description)?;
        out.push(ServiceAd {
            name: name.to_owned(),
            description: description.to_owned(),
        });
        rest = &after[2 + len..];
    }
    if !rest.is_empty() {
        return Err(ServiceListError::Trailing);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use proptest::prelude::*;

    fn peer(n: u8) -> PeerId {
        Keypair::from_seed([n; 32]).peer_id()
    }

    fn pairs(txt: &[(String, String)]) -> Vec<(&str, Option<&[u8]>)> {
        txt.iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_bytes())))
            .collect()
    }

    #[test]
    fn public_announcement_round_trips() {
        let a = Announcement::new(peer(1), None);
        let txt = a.txt();
        assert_eq!(
            txt,
            vec![
                ("v".to_owned(), "1".to_owned()),
                ("id".to_owned(), peer(1).to_string())
            ]
        );
        let back = Announcement::parse(pairs(&txt)).unwrap();
        assert_eq!(back, a);
        assert!(back.is_in(None));
    }

    #[test]
    fn private_tag_is_recognised_only_by_members_and_differs_per_member() {
        let key = NetworkKey::from_secret(b"0123456789abcdef-home").unwrap();
        let other = NetworkKey::from_secret(b"0123456789abcdef-work").unwrap();
        let a = Announcement::parse(pairs(&Announcement::new(peer(1), Some(&key)).txt())).unwrap();
        let b = Announcement::new(peer(2), Some(&key));
        assert!(a.is_in(Some(&key)));
        assert!(!a.is_in(Some(&other)));
        assert!(!a.is_in(None));
        assert!(!Announcement::new(peer(1), None).is_in(Some(&key)));
        assert_ne!(a.network_tag, b.network_tag);
        let txt = a.txt().into_iter().map(|(_, v)| v).collect::<String>();
        assert!(!txt.contains(&key.id().to_string()), "the network id leaks");
    }

    #[test]
    fn bad_announcements_are_typed_errors() {
        let id = peer(1).to_string();
        let v1 = ("v", Some(&b"1"[..]));
        assert_eq!(
            Announcement::parse([("id", Some(id.as_bytes()))]),
            Err(AnnouncementError::Version(None))
        );
        assert_eq!(
            Announcement::parse([("v", Some(&b"2"[..])), ("id", Some(id.as_bytes()))]),
            Err(AnnouncementError::Version(Some("2".into())))
        );
        assert_eq!(Announcement::parse([v1]), Err(AnnouncementError::PeerId));
        let typo = id.replacen('a', "b", 1);
        assert_eq!(
            Announcement::parse([v1, ("id", Some(typo.as_bytes()))]),
            Err(AnnouncementError::PeerId)
        );
        assert_eq!(
            Announcement::parse([v1, ("id", Some(id.as_bytes())), ("net", Some(&b"xyz"[..]))]),
            Err(AnnouncementError::NetworkTag)
        );
        // Unknown keys and upper-case keys are fine.
        let ok = Announcement::parse([
            ("V", Some(&b"1"[..])),
            ("ID", Some(id.as_bytes())),
            ("x", None),
        ]);
        assert_eq!(ok.unwrap().peer, peer(1));
    }

    #[test]
    fn service_list_round_trips_and_rejects_bad_frames() {
        let list = vec![
            ServiceAd {
                name: "chat".into(),
                description: "talk to me".into(),
            },
            ServiceAd {
                name: "printer".into(),
                description: String::new(),
            },
        ];
        let frame = encode_service_list(&list);
        let len = service_list_frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode_service_list(&frame[4..]).unwrap(), list);
        assert_eq!(
            decode_service_list(&frame[4..frame.len() - 1]),
            Err(ServiceListError::Truncated)
        );
        let mut long = frame[4..].to_vec();
        long.push(0);
        assert_eq!(decode_service_list(&long), Err(ServiceListError::Trailing));
        assert_eq!(
            decode_service_list(&[2, 0, 0]),
            Err(ServiceListError::Version(2))
        );
        assert_eq!(
            service_list_frame_len(u32::MAX.to_be_bytes()),
            Err(ServiceListError::TooLarge)
        );
        assert!(matches!(
            decode_service_list(&[1, 0, 1, 3, b'B', b'A', b'D', 0, 0]),
            Err(ServiceListError::Name(_))
        ));
    }

    #[test]
    fn long_descriptions_are_cut_on_a_character_boundary() {
        let list = vec![ServiceAd {
            name: "tv".into(),
            description: "é".repeat(150),
        }];
        let frame = encode_service_list(&list);
        let back = decode_service_list(&frame[4..]).unwrap();
        assert_eq!(back[0].description, "é".repeat(100));
    }

    proptest! {
        #[test]
        fn any_valid_list_round_trips(entries in proptest::collection::vec(("[a-z0-9._/-]{1,64}", ".{0,60}"), 0..20)) {
            let list: Vec<ServiceAd> = entries.into_iter().map(|(name, description)| ServiceAd { name, description }).collect();
            let frame = encode_service_list(&list);
            let expected: Vec<ServiceAd> = list.iter().map(|s| ServiceAd { name: s.name.clone(), description: truncate_utf8(&s.description, MAX_DESCRIPTION).to_owned() }).collect();
            prop_assert_eq!(decode_service_list(&frame[4..]).unwrap(), expected);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_service_list(&bytes);
        }
    }
}
