//! How an application stream or datagram names its service inside a QUIC
//! session.
//!
//! Streams: the opener of a bidirectional QUIC stream first writes a
//! [`StreamOpen`] header; the acceptor answers with a [`StreamReply`]. After
//! an `Accepted` reply both directions carry the application's bytes
//! unchanged, and a FIN on either side is a half-close.
//!
//! ```text
//! StreamOpen:  version (1) | name length (1) | service name (1..=64 bytes)
//! StreamReply: status (1) | message length (1) | message (UTF-8, ≤ 255 bytes)
//! ```
//!
//! Datagrams (QUIC DATAGRAM frames, RFC 9221): `name length (1) | service
//! name | payload`.

/// Version of the stream header.
pub const STREAM_VERSION: u8 = 1;
/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 64;

/// Why a header is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// More bytes are needed.
    #[error("header is incomplete")]
    Incomplete,
    /// A version this node does not speak.
    #[error("unsupported stream header version {0}")]
    Version(u8),
    /// The service name is empty, too long or not allowed.
    #[error("invalid service name: {0}")]
    Name(#[from] ServiceNameError),
    /// An unknown status code.
    #[error("unknown stream status {0}")]
    Status(u8),
}

/// Why a string is not a service name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceNameError {
    /// Empty or longer than [`MAX_SERVICE_NAME`] bytes.
    #[error("a service name has 1 to {MAX_SERVICE_NAME} characters")]
    Length,
    /// A character other than `a-z`, `0-9`, `-`, `_`, `.` or `/`.
    #[error("a service name uses only a-z, 0-9 and - _ . /")]
    Characters,
}

/// Checks that `name` is a valid service name: 1–64 characters of `a-z`,
/// `0-9`, `-`, `_`, `.`, `/`. Names starting with `p2pos/` are the node's
/// own built-in services.
pub fn validate_service_name(name: &str) -> Result<(), ServiceNameError> {
    if name.is_empty() || name.len() > MAX_SERVICE_NAME {
        return Err(ServiceNameError::Length);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./".contains(&b))
    {
        return Err(ServiceNameError::Characters);
    }
    Ok(())
}

/// Reads `name length (1) | name` and checks the name; returns it and the
/// bytes after it.
pub(crate) fn read_service_name(buf: &[u8]) -> Result<(&str, &[u8]), HeaderError> {
    let (&len, rest) = buf.split_first().ok_or(HeaderError::Incomplete)?;
    let len = usize::from(len);
    if len == 0 || len > MAX_SERVICE_NAME {
        return Err(ServiceNameError::Length.into());
    }
    let name = rest.get(..len).ok_or(HeaderError::Incomplete)?;
    let service = std::str::from_utf8(name).map_err(|_| ServiceNameError::Characters)?;
    validate_service_name(service)?;
    Ok((service, &rest[len..]))
}

/// The header that opens a stream for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOpen {
    /// The service the opener wants.
    pub service: String,
}

impl StreamOpen {
    /// Encodes the header. The name must be valid.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.service.len());
        out.push(STREAM_VERSION);
        out.push(self.service.len() as u8);
        out.extend_from_slice(self.service.as_bytes());
        out
    }

    /// Decodes a header from the start of `buf`; returns it and its length.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), HeaderError> {
        let (&version, rest) = buf.split_first().ok_or(HeaderError::Incomplete)?;
        if version != STREAM_VERSION {
            return Err(HeaderError::Version(version));
        }
        let (service, tail) = read_service_name(rest)?;
        Ok((
            StreamOpen {
                service: service.to_owned(),
            },
            buf.len() - tail.len(),
        ))
    }
}

/// The acceptor's answer to a [`StreamOpen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamStatus {
    /// The stream is accepted; application bytes follow.
    Accepted = 0,
    /// No service of that name is registered on the peer.
    NoSuchService = 1,
    /// The service exists but has too many streams waiting.
    Busy = 2,
    /// The service refused or failed (the message says why).
    Failed = 3,
    /// The service exists but is not offered to this peer.
    Forbidden = 4,
}

/// The acceptor's reply header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReply {
    /// Accepted or why not.
    pub status: StreamStatus,
    /// A human-readable reason (empty when accepted).
    pub message: String,
}

impl StreamReply {
    /// An `Accepted` reply.
    pub fn accepted() -> Self {
        StreamReply {
            status: StreamStatus::Accepted,
            message: String::new(),
        }
    }

    /// Encodes the reply; the message is cut to 255 bytes at a character
    /// boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(255);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let mut out = Vec::with_capacity(2 + end);
        out.push(self.status as u8);
        out.push(end as u8);
        out.extend_from_slice(&self.message.as_bytes()[..end]);
        out
    }

    /// Decodes a reply from the start of `buf`; returns it and its length.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), HeaderError> {
        let (&status, rest) = buf.split_first().ok_or(HeaderError::Incomplete)?;
        let status = match status {
            0 => StreamStatus::Accepted,
            1 => StreamStatus::NoSuchService,
            2 => StreamStatus::Busy,
            3 => StreamStatus::Failed,
            4 => StreamStatus::Forbidden,
            other => return Err(HeaderError::Status(other)),
        };
        let (&len, rest) = rest.split_first().ok_or(HeaderError::Incomplete)?;
        let len = usize::from(len);
        let message = rest.get(..len).ok_or(HeaderError::Incomplete)?;
        Ok((
            StreamReply {
                status,
                message: String::from_utf8_lossy(message).into_owned(),
            },
            2 + len,
        ))
    }
}

/// Encodes an application datagram for `service`.
pub fn encode_datagram(service: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + service.len() + payload.len());
    out.push(service.len() as u8);
    out.extend_from_slice(service.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes an application datagram into (service, payload).
pub fn decode_datagram(datagram: &[u8]) -> Result<(&str, &[u8]), HeaderError> {
    read_service_name(datagram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        assert!(validate_service_name("chat").is_ok());
        assert!(validate_service_name("p2pos/ping").is_ok());
        assert_eq!(validate_service_name(""), Err(ServiceNameError::Length));
        assert_eq!(
            validate_service_name("Chat"),
            Err(ServiceNameError::Characters)
        );
        assert_eq!(
            validate_service_name(&"a".repeat(65)),
            Err(ServiceNameError::Length)
        );
    }

    #[test]
    fn header_round_trip_and_incomplete() {
        let open = StreamOpen {
            service: "ssh".into(),
        };
        let bytes = open.encode();
        assert_eq!(StreamOpen::decode(&bytes), Ok((open, 5)));
        assert_eq!(
            StreamOpen::decode(&bytes[..3]),
            Err(HeaderError::Incomplete)
        );
        let reply = StreamReply {
            status: StreamStatus::Failed,
            message: "connection refused".into(),
        };
        let bytes = reply.encode();
        assert_eq!(StreamReply::decode(&bytes), Ok((reply, bytes.len())));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let reply = StreamReply {
            status: StreamStatus::Failed,
            message: "é".repeat(200),
        };
        let (decoded, _) = StreamReply::decode(&reply.encode()).unwrap();
        assert_eq!(decoded.message, "é".repeat(127));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = StreamOpen::decode(&bytes);
            let _ = StreamReply::decode(&bytes);
            let _ = decode_datagram(&bytes);
        }

        #[test]
        fn datagram_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let d = encode_datagram("chat", &payload);
            prop_assert_eq!(decode_datagram(&d), Ok(("chat", &payload[..])));
        }
    }
}
