//! Records and identity: registering (and superseding by identity),
//! updating, deregistering, marking down, and expiring the down records.
//! Only a record's owner may change or remove it.

use super::*;

/// A validated `service/register`.
#[derive(Clone, Debug)]
pub struct Registration<'a> {
    pub service_id: &'a str,
    pub version: &'a str,
    pub protocol: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub env_tag: Option<&'a str>,
    /// Canonical JSON object.
    pub tags_json: &'a str,
    /// The service named no address: `address` is its socket's peer.
    pub address_derived: bool,
}

/// A validated `service/update_metadata`: `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct MetadataUpdate<'a> {
    pub version: Option<&'a str>,
    pub protocol: Option<&'a str>,
    pub port: Option<u16>,
    pub tags_json: Option<&'a str>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UpdateOutcome {
    Updated,
    /// Not the caller's record (superseded, or another connection's).
    NotOwner,
    /// Everything but the port was applied: another instance already has
    /// this identity with the new port.
    PortTaken,
}

/// A registration refused because its identity is in conflict: another
/// live process holds it and the two keep superseding each other.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// The record that keeps the identity.
    pub holder: Uuid,
    /// How long the refused one is told to wait before trying again.
    pub retry_after_ms: u64,
}

#[derive(Debug)]
pub struct Registered {
    pub id: Uuid,
    /// The connection whose registration this one replaced (still up).
    pub superseded: Option<Owner>,
}

/// An instance another node published (its identity, and the node).
pub struct MovedInstance<'a> {
    pub service_id: &'a str,
    pub env_tag: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub node: &'a str,
}

impl Registry {
    pub(super) fn slot_owned(&self, id: &Uuid, owner: Owner) -> Option<u32> {
        self.get(id)
            .filter(|i| i.owner == owner)
            .map(|_| slot_of(id))
    }

    pub(super) fn identity_hash(
        &self,
        service: Sym,
        env: Sym,
        address: &Address,
        port: u16,
    ) -> u64 {
        self.hasher.hash_one((service, env, address, port))
    }

    pub(super) fn hash_of(hasher: &hashbrown::DefaultHashBuilder, i: &Instance) -> u64 {
        hasher.hash_one((i.service, i.env, &i.address, i.port))
    }

    pub(super) fn intern_address(&mut self, address: &str) -> Address {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Address::V4(v4),
            Ok(IpAddr::V6(v6)) => Address::V6(v6),
            Err(_) => Address::Host(self.strings.intern(&address.to_ascii_lowercase())),
        }
    }

    /// Registers an instance owned by `owner`. A record with the same
    /// identity (serviceId, envTag, address, port) is replaced: if it was
    /// up, its owner is returned so its connection can be closed (4000),
    /// unless the identity is in conflict (`conflicts`): then the
    /// registration is refused. `peer` is the registrant's socket address,
    /// asked only when it would supersede (it names the two in a conflict).
    pub fn register(
        &mut self,
        reg: &Registration<'_>,
        owner: Owner,
        now_ms: u64,
        peer: &mut dyn FnMut() -> Option<SocketAddr>,
    ) -> Result<Registered, Refused> {
        let service = self.strings.intern(reg.service_id);
        let env = self.strings.intern(reg.env_tag.unwrap_or(""));
        let address = self.intern_address(reg.address);
        let hash = self.identity_hash(service, env, &address, reg.port);
        let existing = self.slot_of_identity(hash, service, env, &address, reg.port);
        let mut superseded = None;
        if let Some(slot) = existing {
            let old = &self.instances[slot as usize];
            if old.status == Status::Up {
                let refused = Refused {
                    holder: old.id,
                    retry_after_ms: conflicts::RETRY_AFTER_MS,
                };
                let verdict = self.conflicts.judge(hash, now_ms, peer());
                if verdict != Verdict::Supersede {
                    // Refused: the strings interned for it go again.
                    for sym in [Some(service), Some(env), address.host()]
                        .into_iter()
                        .flatten()
                    {
                        self.strings.release(sym);
                    }
                }
                match verdict {
                    Verdict::Supersede => {}
                    Verdict::Refuse => return Err(refused),
                    Verdict::Conflict { holder, loser } => {
                        let show = |p: Option<SocketAddr>| {
                            p.map_or_else(|| "an unknown peer".to_string(), |p| p.to_string())
                        };
                        let why = format!(
                            "{} registrations within {} s claimed this identity; it stays with {} and {} is refused for now (two live processes with one identity?)",
                            conflicts::MAX_SUPERSEDES + 1,
                            conflicts::WINDOW_MS / 1000,
                            show(holder),
                            show(loser),
                        );
                        tracing::warn!(instance = %refused.holder, "identity conflict: {why}");
                        self.publish(now_ms, EventKind::IdentityConflict, slot, Some(&why));
                        return Err(refused);
                    }
                }
                let old = &self.instances[slot as usize];
                superseded = Some(old.owner);
                self.publish(
                    now_ms,
                    EventKind::Superseded,
                    slot,
                    Some("superseded by a new registration"),
                );
            }
            self.remove(slot);
        }
        let version = self.strings.intern(reg.version);
        let protocol = self.strings.intern(reg.protocol);
        let tags = self.strings.intern(reg.tags_json);
        let entry = self.instances.vacant_entry();
        let slot = entry.key() as u32;
        self.high_water = self.high_water.max(slot + 1);
        let mut random = [0u8; 10];
        random[..6].copy_from_slice(&fastrand::u64(..).to_le_bytes()[..6]);
        random[6..].copy_from_slice(&slot.to_be_bytes());
        let id = uuid::Builder::from_unix_timestamp_millis(now_ms, &random).into_uuid();
        debug_assert_eq!(slot_of(&id), slot);
        let list = self.by_service.entry(service).or_default();
        list.push(slot);
        entry.insert(Instance {
            id,
            service,
            env,
            version,
            protocol,
            tags,
            address,
            port: reg.port,
            address_derived: reg.address_derived,
            status: Status::Up,
            owner,
            connected_at_ms: now_ms,
            last_seen_ms: now_ms,
            index_pos: (list.len() - 1) as u32,
            rtt: Rtt::UNMEASURED,
        });
        let (instances, hasher) = (&self.instances, &self.hasher);
        self.identity.insert_unique(hash, slot, |&s| {
            Self::hash_of(hasher, &instances[s as usize])
        });
        self.mark_changed(slot);
        let reason = reg
            .address_derived
            .then_some("no address registered: took the socket's peer address");
        self.publish(now_ms, EventKind::Registered, slot, reason);
        Ok(Registered { id, superseded })
    }

    /// Applies a metadata update from the owner.
    pub fn update(
        &mut self,
        id: &Uuid,
        owner: Owner,
        update: &MetadataUpdate<'_>,
        now_ms: u64,
    ) -> UpdateOutcome {
        let Some(slot) = self.slot_owned(id, owner) else {
            return UpdateOutcome::NotOwner;
        };
        let mut port_taken = false;
        if let Some(port) = update.port {
            let i = &self.instances[slot as usize];
            let (service, env, address) = (i.service, i.env, i.address);
            let hash = self.identity_hash(service, env, &address, port);
            let instances = &self.instances;
            let holder = self
                .identity
                .find(hash, |&s| {
                    let o = &instances[s as usize];
                    s != slot
                        && o.service == service
                        && o.env == env
                        && o.address == address
                        && o.port == port
                })
                .copied();
            match holder {
                // A retained down record never blocks a live instance: it
                // goes, as it would for a registration of that identity.
                Some(down) if self.instances[down as usize].status == Status::Down => {
                    self.remove(down)
                }
                Some(_) => port_taken = true,
                None => {}
            }
        }
        // The port is part of the identity: re-index, unless another live
        // instance already holds the new identity (then the port stays).
        if let Some(port) = update.port.filter(|_| !port_taken) {
            let (instances, hasher) = (&self.instances, &self.hasher);
            let hash = Self::hash_of(hasher, &instances[slot as usize]);
            if let Ok(found) = self.identity.find_entry(hash, |&s| s == slot) {
                found.remove();
            }
            self.instances[slot as usize].port = port;
            let (instances, hasher) = (&self.instances, &self.hasher);
            let hash = Self::hash_of(hasher, &instances[slot as usize]);
            self.identity.insert_unique(hash, slot, |&s| {
                Self::hash_of(hasher, &instances[s as usize])
            });
        }
        self.mark_changed(slot);
        for (text, field) in [
            (update.version, 0),
            (update.protocol, 1),
            (update.tags_json, 2),
        ] {
            let Some(text) = text else { continue };
            let new = self.strings.intern(text);
            let record = &mut self.instances[slot as usize];
            let old = match field {
                0 => std::mem::replace(&mut record.version, new),
                1 => std::mem::replace(&mut record.protocol, new),
                _ => std::mem::replace(&mut record.tags, new),
            };
            self.strings.release(old);
        }
        self.instances[slot as usize].last_seen_ms = now_ms;
        self.mark_changed(slot);
        self.publish(now_ms, EventKind::Updated, slot, None);
        if port_taken {
            UpdateOutcome::PortTaken
        } else {
            UpdateOutcome::Updated
        }
    }

    /// Removes the owner's record. False if it is not the owner's.
    pub fn deregister(&mut self, id: &Uuid, owner: Owner, reason: &str, now_ms: u64) -> bool {
        let Some(slot) = self.slot_owned(id, owner) else {
            return false;
        };
        self.publish(now_ms, EventKind::Deregistered, slot, Some(reason));
        self.remove(slot);
        true
    }

    /// The owner's connection ended without a deregister: an up record is
    /// removed; a down one stays for its retention period.
    pub fn disconnected(&mut self, id: &Uuid, owner: Owner, now_ms: u64) {
        if let Some(slot) = self.slot_owned(id, owner)
            && self.instances[slot as usize].status == Status::Up
        {
            self.publish(now_ms, EventKind::Deregistered, slot, Some("disconnected"));
            self.remove(slot);
        }
    }

    /// The owner missed a liveness deadline: the record leaves discovery
    /// and is kept, down, for the retention period.
    pub fn mark_down(&mut self, id: &Uuid, owner: Owner, reason: &str, now_ms: u64) -> bool {
        let Some(slot) = self.slot_owned(id, owner) else {
            return false;
        };
        if self.instances[slot as usize].status != Status::Up {
            return false;
        }
        self.unlist(slot);
        self.instances[slot as usize].status = Status::Down;
        self.down_count += 1;
        self.down.push_back((slot, *id, now_ms));
        self.publish(now_ms, EventKind::Down, slot, Some(reason));
        while self.down_count > self.config.max_down_retained
            // Entries of down records replaced by a new registration stay
            // queued until they age out; bound them too.
            || self.down.len() > 2 * self.config.max_down_retained + 1024
        {
            self.forget_oldest_down(now_ms);
        }
        true
    }

    /// Drops down records older than the retention period.
    pub fn expire_down(&mut self, now_ms: u64) {
        self.conflicts.expire(now_ms);
        while let Some(&(_, _, at)) = self.down.front() {
            if now_ms.saturating_sub(at) < self.config.down_retention_ms {
                break;
            }
            self.forget_oldest_down(now_ms);
        }
    }

    pub(super) fn forget_oldest_down(&mut self, now_ms: u64) {
        let Some((slot, id, _)) = self.down.pop_front() else {
            return;
        };
        if self.get(&id).is_some_and(|i| i.status == Status::Down) {
            self.publish(
                now_ms,
                EventKind::Deregistered,
                slot,
                Some("down record expired"),
            );
            self.remove(slot);
        }
    }

    /// Records a sign of life from the owner, with the round trip of the
    /// ping it answered, if it was one.
    pub fn touch(&mut self, id: &Uuid, owner: Owner, now_ms: u64, rtt: Option<Rtt>) {
        if let Some(slot) = self.slot_owned(id, owner) {
            let record = &mut self.instances[slot as usize];
            record.last_seen_ms = now_ms;
            if let Some(rtt) = rtt {
                record.rtt = rtt;
            }
        }
    }

    pub(super) fn publish(
        &mut self,
        now_ms: u64,
        kind: EventKind,
        slot: u32,
        reason: Option<&str>,
    ) {
        let i = &self.instances[slot as usize];
        let service = self.strings.resolve(i.service).clone();
        self.events
            .publish(now_ms, kind, i.id, service, reason.map(Arc::from));
    }

    /// Takes an up record out of discovery.
    pub(super) fn unlist(&mut self, slot: u32) {
        let i = &self.instances[slot as usize];
        let (service, pos) = (i.service, i.index_pos as usize);
        let list = self
            .by_service
            .get_mut(&service)
            .expect("up records are listed");
        debug_assert_eq!(list[pos], slot);
        list.swap_remove(pos);
        if let Some(&moved) = list.get(pos) {
            self.instances[moved as usize].index_pos = pos as u32;
        }
        if list.is_empty() {
            self.by_service.remove(&service);
        }
        self.mark_changed(slot);
    }

    /// The slot of the up record with `moved`'s identity, if one is here.
    /// Interns nothing: names this node does not know match nothing here.
    fn slot_with_identity(&self, moved: &MovedInstance<'_>) -> Option<u32> {
        let service = self.strings.find(moved.service_id)?;
        let env = self.strings.find(moved.env_tag)?;
        let address = match moved.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Address::V4(v4),
            Ok(IpAddr::V6(v6)) => Address::V6(v6),
            Err(_) => Address::Host(self.strings.find(&moved.address.to_ascii_lowercase())?),
        };
        let hash = self.identity_hash(service, env, &address, moved.port);
        let slot = self.slot_of_identity(hash, service, env, &address, moved.port)?;
        (self.instances[slot as usize].status == Status::Up).then_some(slot)
    }

    /// The slot of the record (up or down) with this identity, if any.
    fn slot_of_identity(
        &self,
        hash: u64,
        service: Sym,
        env: Sym,
        address: &Address,
        port: u16,
    ) -> Option<u32> {
        let instances = &self.instances;
        self.identity
            .find(hash, |&slot| {
                let i = &instances[slot as usize];
                i.service == service && i.env == env && i.address == *address && i.port == port
            })
            .copied()
    }

    /// The id of the up record with `moved`'s identity, if one is here.
    pub fn up_with_identity(&self, moved: &MovedInstance<'_>) -> Option<Uuid> {
        self.slot_with_identity(moved)
            .map(|slot| self.instances[slot as usize].id)
    }

    /// Another controller node holds this identity now, by a registration
    /// newer than record `local` here (the caller orders the two): the
    /// record, if it is still `local` and up, is superseded and removed,
    /// and its owner returned so that its connection is closed (4000).
    pub fn supersede_moved(
        &mut self,
        local: &Uuid,
        moved: &MovedInstance<'_>,
        now_ms: u64,
    ) -> Option<Owner> {
        let slot = self.slot_with_identity(moved)?;
        let old = &self.instances[slot as usize];
        if old.id != *local {
            return None;
        }
        let owner = old.owner;
        let why = format!("superseded by a registration on node {}", moved.node);
        self.publish(now_ms, EventKind::Superseded, slot, Some(&why));
        self.remove(slot);
        Some(owner)
    }

    pub(super) fn remove(&mut self, slot: u32) {
        if self.instances[slot as usize].status == Status::Up {
            self.unlist(slot);
        } else {
            self.down_count -= 1;
        }
        let (instances, hasher) = (&self.instances, &self.hasher);
        let hash = Self::hash_of(hasher, &instances[slot as usize]);
        match self.identity.find_entry(hash, |&s| s == slot) {
            Ok(found) => {
                found.remove();
            }
            Err(_) => debug_assert!(false, "every record is in the identity index"),
        }
        let i = self.instances.remove(slot as usize);
        for sym in [i.service, i.env, i.version, i.protocol, i.tags] {
            self.strings.release(sym);
        }
        if let Address::Host(sym) = i.address {
            self.strings.release(sym);
        }
    }
}
