//! Identity: every node is an ed25519 key pair, and its [`PeerId`] is the
//! public key.
//!
//! # Text form of a peer ID
//!
//! 55 characters of lowercase RFC 4648 base32 (`a-z`, `2-7`, no padding)
//! encoding 34 bytes: the 32-byte public key followed by a 2-byte checksum
//! (CRC-16/XMODEM of the key, big-endian).
//!
//! Why this form: base32 has no characters that look alike in common fonts
//! and no characters a shell, URL or file name treats specially, so an ID
//! survives copy and paste, double-click selection and being read aloud.
//! Parsing accepts upper case too. The checksum turns a typo into a clear
//! error instead of a dial to a key nobody holds: a CRC-16 catches every
//! burst of up to 16 wrong bits, so every single mistyped character (5 bits)
//! and every swap of two neighbours is caught, not merely most.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

/// Length of a peer ID in its text form.
pub const PEER_ID_TEXT_LEN: usize = 55;

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): the 32-byte key
/// follows it. Used as the raw public key in TLS (RFC 7250).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// DER prefix of an ed25519 PKCS#8 v1 private key (RFC 8410): the 32-byte
/// seed follows it.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A node's identity: its ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

/// Why a string is not a peer ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdParseError {
    /// Wrong number of characters.
    #[error("a peer ID has {PEER_ID_TEXT_LEN} characters, this has {0}")]
    Length(usize),
    /// A character outside `a-z2-7`.
    #[error("a peer ID uses only the letters a-z and the digits 2-7")]
    Alphabet,
    /// The checksum does not match: almost always a typo.
    #[error("peer ID checksum does not match: check it for a typo")]
    Checksum,
    /// The bytes are not a valid ed25519 public key.
    #[error("not a valid ed25519 public key")]
    InvalidKey,
}

/// Why a raw public key from a TLS handshake is not a peer's key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an ed25519 SubjectPublicKeyInfo")]
pub struct SpkiError;

impl PeerId {
    /// The ID for a 32-byte public key, if it is a valid ed25519 point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, PeerIdParseError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| PeerIdParseError::InvalidKey)?;
        Ok(PeerId(bytes))
    }

    /// The ID for 32 bytes without checking that they are a valid point.
    /// Only for keys whose next use is a signature check (which fails for
    /// an invalid point): DHT ID proofs and record owners. It saves one
    /// point decompression per message.
    pub(crate) fn from_bytes_unchecked(bytes: [u8; 32]) -> Self {
        PeerId(bytes)
    }

    /// The raw 32 bytes of the public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as a DER SubjectPublicKeyInfo, the raw public key form of TLS.
    pub fn to_spki_der(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44);
        out.extend_from_slice(&ED25519_SPKI_PREFIX);
        out.extend_from_slice(&self.0);
        out
    }

    /// The peer ID inside a DER SubjectPublicKeyInfo sent in a handshake.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, SpkiError> {
        let key = der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .filter(|k| k.len() == 32)
            .ok_or(SpkiError)?;
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(key);
        PeerId::from_bytes(bytes).map_err(|_| SpkiError)
    }

    /// Checks an ed25519 signature by this peer.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify(message, &ed25519_dalek::Signature::from_bytes(signature))
            .is_ok()
    }

    /// A short form for tables and logs: the first 10 characters.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(10);
        s
    }

    fn checksum(key: &[u8; 32]) -> [u8; 2] {
        crc16_xmodem(key).to_be_bytes()
    }
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0, no reflection).
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = [0u8; 34];
        raw[..32].copy_from_slice(&self.0);
        raw[32..].copy_from_slice(&Self::checksum(&self.0));
        f.write_str(&BASE32_NOPAD.encode(&raw).to_ascii_lowercase())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = PeerIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != PEER_ID_TEXT_LEN {
            return Err(PeerIdParseError::Length(s.chars().count()));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || (b'2'..=b'7').contains(&b))
        {
            return Err(PeerIdParseError::Alphabet);
        }
        let raw = BASE32_NOPAD
            .decode(s.to_ascii_uppercase().as_bytes())
            .map_err(|_| PeerIdParseError::Alphabet)?;
        // 55 base32 characters carry 275 bits: 34 bytes and 3 bits that must be zero.
        let raw: [u8; 34] = raw.try_into().map_err(|_| PeerIdParseError::Alphabet)?;
        let mut key = [0u8; 32];
        key.copy_from_slice(&raw[..32]);
        if raw[32..] != Self::checksum(&key) {
            return Err(PeerIdParseError::Checksum);
        }
        PeerId::from_bytes(key)
    }
}

/// A node's secret key and its public [`PeerId`].
#[derive(Clone)]
pub struct Keypair {
    secret: SigningKey,
}

impl Keypair {
    /// The key pair for a 32-byte secret seed. The caller supplies the
    /// randomness (this crate has none of its own).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Keypair {
            secret: SigningKey::from_bytes(&seed),
        }
    }

    /// The 32-byte secret seed, for storing the key.
    pub fn seed(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.secret.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.secret.sign(message).to_bytes()
    }

    /// The secret key as DER PKCS#8 v1, the form TLS libraries load.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        out.extend_from_slice(&ED25519_PKCS8_PREFIX);
        out.extend_from_slice(&self.seed());
        out
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.peer_id().short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(seed: u8) -> PeerId {
        Keypair::from_seed([seed; 32]).peer_id()
    }

    #[test]
    fn checksum_is_crc16_xmodem() {
        // The published check value of CRC-16/XMODEM over "123456789".
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
    }

    #[test]
    fn text_form_is_55_lowercase_chars() {
        let s = id(1).to_string();
        assert_eq!(s.len(), PEER_ID_TEXT_LEN);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
    }

    #[test]
    fn errors_name_the_problem() {
        let s = id(2).to_string();
        assert_eq!("abc".parse::<PeerId>(), Err(PeerIdParseError::Length(3)));
        let mut bad = s.clone();
        bad.replace_range(0..1, "1");
        assert_eq!(bad.parse::<PeerId>(), Err(PeerIdParseError::Alphabet));
        let mut typo = s.clone().into_bytes();
        typo[5] = if typo[5] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            String::from_utf8(typo).unwrap().parse::<PeerId>(),
            Err(PeerIdParseError::Checksum)
        );
    }

    #[test]
    fn spki_round_trip_and_rejects_other_keys() {
        let p = id(3);
        assert_eq!(PeerId::from_spki_der(&p.to_spki_der()), Ok(p));
        assert_eq!(PeerId::from_spki_der(&[0x30, 0x2a]), Err(SpkiError));
        let mut other = p.to_spki_der();
        other[8] = 0x71; // OID of ed448
        assert_eq!(PeerId::from_spki_der(&other), Err(SpkiError));
    }

    #[test]
    fn signatures_verify_only_for_the_signer() {
        let k = Keypair::from_seed([9; 32]);
        let sig = k.sign(b"hello");
        assert!(k.peer_id().verify(b"hello", &sig));
        assert!(!k.peer_id().verify(b"hellO", &sig));
        assert!(!id(8).verify(b"hello", &sig));
    }

    proptest! {
        #[test]
        fn text_round_trips(seed in any::<[u8; 32]>()) {
            let p = Keypair::from_seed(seed).peer_id();
            let s = p.to_string();
            prop_assert_eq!(s.parse::<PeerId>().unwrap(), p);
            prop_assert_eq!(s.to_ascii_uppercase().parse::<PeerId>().unwrap(), p);
            prop_assert_eq!(format!("  {s}\n").parse::<PeerId>().unwrap(), p);
        }

        #[test]
        fn any_single_character_change_is_caught(seed in any::<[u8; 32]>(), pos in 0usize..55, c in 0usize..32) {
            let s = Keypair::from_seed(seed).peer_id().to_string();
            let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
            let mut bytes = s.clone().into_bytes();
            prop_assume!(bytes[pos] != alphabet[c]);
            bytes[pos] = alphabet[c];
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert!(changed.parse::<PeerId>().is_err());
        }

        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = s.parse::<PeerId>();
        }
    }
}
