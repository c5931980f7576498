//! Durable state in `peers.redb`: the peers this node has met and the
//! addresses it last reached them at, so that a restarted node can find its
//! peers again.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use p2pos_proto::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const PEERS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("peers");

/// Peers kept at most; the least recently seen are forgotten first.
pub const MAX_PEERS: usize = 10_000;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("peer store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// What the node remembers of a peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerEntry {
    /// The address the last session ran over.
    pub last_addr: SocketAddr,
    /// When the last session was established (Unix seconds).
    pub last_seen: u64,
}

/// The peer store.
#[derive(Debug)]
pub struct PeerStore {
    db: Database,
}

impl PeerStore {
    /// Opens or creates the store.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(PEERS).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(PeerStore { db })
    }

    /// Records a session with `peer` at `addr`.
    pub fn record(&self, peer: PeerId, addr: SocketAddr) -> Result<(), StoreError> {
        let entry = PeerEntry {
            last_addr: addr,
            last_seen: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let value = serde_json::to_vec(&entry).map_err(err)?;
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut table = tx.open_table(PEERS).map_err(err)?;
            table
                .insert(peer.as_bytes(), value.as_slice())
                .map_err(err)?;
            if table.len().map_err(err)? as usize > MAX_PEERS {
                let mut oldest: Option<([u8; 32], u64)> = None;
                for item in table.iter().map_err(err)? {
                    let (k, v) = item.map_err(err)?;
                    let seen = serde_json::from_slice::<PeerEntry>(v.value())
                        .map(|e| e.last_seen)
                        .unwrap_or(0);
                    if oldest.is_none_or(|(_, s)| seen < s) {
                        oldest = Some((*k.value(), seen));
                    }
                }
                if let Some((key, _)) = oldest {
                    table.remove(&key).map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }

    /// The entry of `peer`, if known.
    pub fn get(&self, peer: &PeerId) -> Result<Option<PeerEntry>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(PEERS).map_err(err)?;
        let Some(v) = table.get(peer.as_bytes()).map_err(err)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    /// All known peers.
    pub fn all(&self) -> Result<Vec<(PeerId, PeerEntry)>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(PEERS).map_err(err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            let (Ok(peer), Ok(entry)) = (
                PeerId::from_bytes(*k.value()),
                serde_json::from_slice::<PeerEntry>(v.value()),
            ) else {
                continue;
            };
            out.push((peer, entry));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pos_proto::Keypair;

    #[test]
    fn remembers_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.redb");
        let peer = Keypair::from_seed([4; 32]).peer_id();
        {
            let store = PeerStore::open(&path).unwrap();
            store
                .record(peer, "127.0.0.1:7447".parse().unwrap())
                .unwrap();
        }
        let store = PeerStore::open(&path).unwrap();
        let entry = store.get(&peer).unwrap().unwrap();
        assert_eq!(entry.last_addr, "127.0.0.1:7447".parse().unwrap());
        assert_eq!(store.all().unwrap().len(), 1);
    }
}
