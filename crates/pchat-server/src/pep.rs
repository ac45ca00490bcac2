//! Personal eventing on users' accounts (XEP-0163, the subset of XEP-0060 that clients use):
//! publish (with publish-options), retrieve, retract, delete, on nodes kept in the store so
//! they follow a failover. Bookmarks are XEP-0402's node `urn:xmpp:bookmarks:1` (one item per
//! room, the room's JID as the item id); the two older forms of XEP-0048 bookmarks — the PEP
//! node `storage:bookmarks` and private XML storage (XEP-0049) — are views of the same items,
//! read and written through them (XEP-0402 §5.3's `#compat` and `#compat-pep`), so clients of
//! every generation see one list. Other private XML is a hidden node per element.
//!
//! A node is read by its owner, or by every user of this server when its access model is
//! open (pchat keeps no rosters, see [`PepAccess`]). Publications, retractions and
//! deletions are told to the owner's sessions (`headline` event messages): on this server at
//! once, and in a pool on the other servers too, through the store ([`Store::pep_announce`],
//! a [`pchat_store::TickKind::Pep`] tick there, [`tell_remote_change`]). Bounded per
//! account: nodes, items per node, bytes per item.

use pchat_store::{PepAccess, PepChange, PepEvent, PepItem, PepNode, Store, PEP_ITEMS_MAX};
use pchat_xmpp::{ns, Element, StanzaError};

use crate::state::State;

/// XEP-0060 namespaces.
pub const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
/// XEP-0060 owner use cases.
pub const PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
/// XEP-0060 event notifications.
pub const PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
/// XEP-0060 application error conditions.
pub const PUBSUB_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
/// The publish-options form's FORM_TYPE.
pub const PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";
/// XEP-0402 bookmarks node and payload namespace.
pub const BOOKMARKS: &str = "urn:xmpp:bookmarks:1";
/// XEP-0048 bookmarks (PEP node and private XML storage).
pub const LEGACY_BOOKMARKS: &str = "storage:bookmarks";
/// XEP-0049 private XML storage.
pub const PRIVATE: &str = "jabber:iq:private";
/// XEP-0054 vCards.
pub const VCARD: &str = "vcard-temp";
/// The hidden node that holds a user's vCard (readable by every user of the server, like
/// an open node, but only through vcard-temp).
const VCARD_NODE: &str = "jabber:iq:private#vcard-temp#vCard";

/// Nodes one account may have (the bookmarks, avatar data and metadata, nickname, … and
/// one per private XML element).
pub const NODES_MAX: usize = 16;
/// Items a node other than the bookmarks keeps at most.
pub const ITEMS_MAX_OTHER: u32 = 8;
/// Bytes of one item's payload as serialized (an avatar's data item is the largest).
pub const PAYLOAD_BYTES_MAX: usize = 128 * 1024;
/// Bytes of one bookmark.
pub const BOOKMARK_BYTES_MAX: usize = 4096;
/// Prefix of the hidden nodes that hold private XML (not listed, not readable as PEP).
const PRIVATE_PREFIX: &str = "jabber:iq:private#";

/// Does the server answer this iq for the account it is addressed to?
pub fn handles(iq: &Element) -> bool {
    iq.elements().next().is_some_and(|c| {
        c.is("pubsub", PUBSUB)
            || c.is("pubsub", PUBSUB_OWNER)
            || c.is("query", PRIVATE)
            || c.is("vCard", VCARD)
            || c.is("query", ns::DISCO_INFO)
            || c.is("query", ns::DISCO_ITEMS)
    })
}

/// Who asks, about whose account.
struct Ask<'a> {
    state: &'a State,
    store: &'a dyn Store,
    iq: &'a Element,
    requester: &'a str,
    owner: &'a str,
}

/// Answers a PEP, private storage or account disco request of `requester` addressed to the
/// account `owner` (a bare JID of this server).
pub async fn answer_iq(
    state: &State,
    store: &dyn Store,
    iq: &Element,
    requester: &str,
    owner: &str,
) -> Element {
    let ask = Ask {
        state,
        store,
        iq,
        requester,
        owner,
    };
    match ask.answer().await {
        Ok(reply) => reply,
        Err(error) => error,
    }
}

type Reply = Result<Element, Element>;

fn fail(iq: &Element, condition: StanzaError, text: &str) -> Element {
    condition.reply_to(iq, Some(text))
}

/// A stanza error carrying a XEP-0060 application condition as well.
fn fail_pubsub(iq: &Element, condition: StanzaError, app: &str, text: &str) -> Element {
    let mut reply = condition.reply_to(iq, Some(text));
    if let Some(error) = reply.get_child_mut("error", ns::CLIENT) {
        error
            .children
            .push(pchat_xmpp::element::Node::Element(Element::new(
                app,
                PUBSUB_ERRORS,
            )));
    }
    reply
}

fn store_failed(iq: &Element, e: &pchat_store::StoreError) -> Element {
    tracing::warn!(error = %e, "PEP: the store failed");
    fail(
        iq,
        StanzaError::InternalServerError,
        "the store cannot be reached; try again",
    )
}

fn new_item_id() -> String {
    use rand::Rng as _;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

impl Ask<'_> {
    fn is_owner(&self) -> bool {
        self.requester == self.owner
    }

    fn result(&self) -> Element {
        let mut r = Element::new("iq", ns::CLIENT).attr("type", "result");
        if let Some(id) = self.iq.get_attr("id") {
            r = r.attr("id", id);
        }
        if let Some(from) = self.iq.get_attr("from") {
            r = r.attr("to", from);
        }
        if let Some(to) = self.iq.get_attr("to") {
            r = r.attr("from", to);
        }
        r
    }

    async fn answer(&self) -> Reply {
        let iq = self.iq;
        let ty = iq.get_attr("type").unwrap_or_default();
        let Some(child) = iq.elements().next() else {
            return Err(fail(iq, StanzaError::BadRequest, "an empty request"));
        };
        match (ty, child.name.as_str(), child.ns.as_str()) {
            ("get", "query", ns::DISCO_INFO) => Ok(self.disco_info()),
            ("get", "query", ns::DISCO_ITEMS) => self.disco_items().await,
            (_, "query", PRIVATE) => self.private(ty, child).await,
            ("get", "vCard", VCARD) => self.vcard_get().await,
            ("set", "vCard", VCARD) => self.vcard_set(child).await,
            ("set", "pubsub", PUBSUB) => {
                if let Some(publish) = child.get_child("publish", PUBSUB) {
                    self.publish(child, publish).await
                } else if let Some(retract) = child.get_child("retract", PUBSUB) {
                    self.retract(retract).await
                } else {
                    Err(fail(
                        iq,
                        StanzaError::FeatureNotImplemented,
                        "PEP here supports publish, retract, items and delete",
                    ))
                }
            }
            ("get", "pubsub", PUBSUB) => match child.get_child("items", PUBSUB) {
                Some(items) => self.items(items).await,
                None => Err(fail(
                    iq,
                    StanzaError::FeatureNotImplemented,
                    "PEP here supports publish, retract, items and delete",
                )),
            },
            ("set", "pubsub", PUBSUB_OWNER) => match child.get_child("delete", PUBSUB_OWNER) {
                Some(delete) => self.delete(delete).await,
                None => Err(fail(
                    iq,
                    StanzaError::FeatureNotImplemented,
                    "node configuration is set by publish-options",
                )),
            },
            _ => Err(fail(
                iq,
                StanzaError::FeatureNotImplemented,
                "not a request this account answers",
            )),
        }
    }

    fn own_only(&self) -> Result<(), Element> {
        if self.is_owner() {
            Ok(())
        } else {
            Err(fail_pubsub(
                self.iq,
                StanzaError::Forbidden,
                "publisher-not-authorized",
                "only the account's owner may change its nodes",
            ))
        }
    }

    fn disco_info(&self) -> Element {
        let feature = |v: &str| Element::new("feature", ns::DISCO_INFO).attr("var", v);
        let mut q = Element::new("query", ns::DISCO_INFO)
            .child(
                Element::new("identity", ns::DISCO_INFO)
                    .attr("category", "account")
                    .attr("type", "registered"),
            )
            .child(
                Element::new("identity", ns::DISCO_INFO)
                    .attr("category", "pubsub")
                    .attr("type", "pep"),
            );
        for f in [
            ns::DISCO_INFO,
            ns::DISCO_ITEMS,
            PUBSUB,
            "http://jabber.org/protocol/pubsub#publish",
            "http://jabber.org/protocol/pubsub#publish-options",
            "http://jabber.org/protocol/pubsub#auto-create",
            "http://jabber.org/protocol/pubsub#persistent-items",
            "http://jabber.org/protocol/pubsub#retrieve-items",
            "http://jabber.org/protocol/pubsub#retract-items",
            "http://jabber.org/protocol/pubsub#delete-nodes",
            "http://jabber.org/protocol/pubsub#item-ids",
            "http://jabber.org/protocol/pubsub#access-open",
            "http://jabber.org/protocol/pubsub#access-whitelist",
            PRIVATE,
            VCARD,
            "urn:xmpp:bookmarks:1#compat",
            "urn:xmpp:bookmarks:1#compat-pep",
        ] {
            q = q.child(feature(f));
        }
        self.result().child(q)
    }

    async fn disco_items(&self) -> Reply {
        let nodes = self
            .store
            .pep_nodes(self.owner)
            .await
            .map_err(|e| store_failed(self.iq, &e))?;
        let mut q = Element::new("query", ns::DISCO_ITEMS);
        for node in nodes {
            if node.starts_with(PRIVATE_PREFIX) {
                continue;
            }
            if !self.is_owner() {
                let open = self
                    .store
                    .pep_node(self.owner, &node)
                    .await
                    .map_err(|e| store_failed(self.iq, &e))?
                    .is_some_and(|c| c.access == PepAccess::Users);
                if !open {
                    continue;
                }
            }
            q = q.child(
                Element::new("item", ns::DISCO_ITEMS)
                    .attr("jid", self.owner)
                    .attr("node", node),
            );
        }
        Ok(self.result().child(q))
    }

    async fn publish(&self, pubsub: &Element, publish: &Element) -> Reply {
        let iq = self.iq;
        self.own_only()?;
        let node = node_of(iq, publish)?;
        let mut items = publish.elements().filter(|e| e.is("item", PUBSUB));
        let (Some(item), None) = (items.next(), items.next()) else {
            return Err(fail_pubsub(
                iq,
                StanzaError::BadRequest,
                "item-required",
                "publish one item",
            ));
        };
        let mut payloads = item.elements();
        let (Some(payload), None) = (payloads.next(), payloads.next()) else {
            return Err(fail_pubsub(
                iq,
                StanzaError::BadRequest,
                "invalid-payload",
                "an item holds exactly one payload element",
            ));
        };
        let options = publish_options(iq, pubsub)?;
        let id = item
            .get_attr("id")
            .filter(|id| !id.is_empty())
            .map_or_else(new_item_id, str::to_owned);
        if node == LEGACY_BOOKMARKS {
            if !payload.is("storage", LEGACY_BOOKMARKS) {
                return Err(fail_pubsub(
                    iq,
                    StanzaError::BadRequest,
                    "invalid-payload",
                    "storage:bookmarks holds <storage xmlns='storage:bookmarks'/>",
                ));
            }
            self.replace_bookmarks(payload).await?;
        } else {
            if node.starts_with(PRIVATE_PREFIX) {
                return Err(fail(
                    iq,
                    StanzaError::NotAllowed,
                    "this node name is reserved for private XML storage",
                ));
            }
            self.put(&node, &id, payload, options).await?;
        }
        let done = Element::new("pubsub", PUBSUB).child(
            Element::new("publish", PUBSUB)
                .attr("node", node)
                .child(Element::new("item", PUBSUB).attr("id", id)),
        );
        Ok(self.result().child(done))
    }

    /// Stores one item in `node` (made when new, reconfigured by `options`) and tells the
    /// owner's sessions.
    async fn put(
        &self,
        node: &str,
        id: &str,
        payload: &Element,
        options: Option<Options>,
    ) -> Result<(), Element> {
        let iq = self.iq;
        let xml = payload.to_xml_in("");
        let bytes_max = if node == BOOKMARKS || node == DISPLAYED {
            BOOKMARK_BYTES_MAX
        } else {
            PAYLOAD_BYTES_MAX
        };
        if xml.len() > bytes_max {
            return Err(fail_pubsub(
                iq,
                StanzaError::NotAcceptable,
                "payload-too-big",
                &format!("an item of this node holds at most {bytes_max} bytes"),
            ));
        }
        if node == BOOKMARKS && (!payload.is("conference", BOOKMARKS) || !id.contains('@')) {
            return Err(fail_pubsub(
                iq,
                StanzaError::BadRequest,
                "invalid-payload",
                "a bookmark is <conference xmlns='urn:xmpp:bookmarks:1'/> with the room's JID as its id",
            ));
        }
        let existing = self
            .store
            .pep_node(self.owner, node)
            .await
            .map_err(|e| store_failed(iq, &e))?;
        if existing.is_none() {
            let count = self
                .store
                .pep_nodes(self.owner)
                .await
                .map_err(|e| store_failed(iq, &e))?
                .len();
            if count >= NODES_MAX {
                return Err(fail(
                    iq,
                    StanzaError::ResourceConstraint,
                    &format!("an account has at most {NODES_MAX} nodes; delete one first"),
                ));
            }
        }
        let base = existing.unwrap_or_else(|| default_config(node));
        let config = match options {
            Some(o) => o.apply(base, items_cap(node)),
            None => base,
        };
        let item = PepItem {
            id: id.to_owned(),
            payload: xml,
            at: crate::datetime::now(),
        };
        self.store
            .pep_publish(self.owner, node, config, item)
            .await
            .map_err(|e| store_failed(iq, &e))?;
        self.notify(
            node,
            Element::new("item", PUBSUB_EVENT)
                .attr("id", id)
                .child(payload.clone()),
            PepChange::Published {
                item: id.to_owned(),
            },
        )
        .await;
        Ok(())
    }

    async fn items(&self, items: &Element) -> Reply {
        let iq = self.iq;
        let node = node_of(iq, items)?;
        let wanted: Vec<&str> = items
            .elements()
            .filter(|e| e.is("item", PUBSUB))
            .filter_map(|e| e.get_attr("id"))
            .collect();
        let max: Option<usize> = items.get_attr("max_items").and_then(|m| m.parse().ok());
        let stored: Vec<(String, Element)> = if node == LEGACY_BOOKMARKS {
            self.own_only_read()?;
            vec![("current".to_owned(), self.legacy_storage().await?)]
        } else {
            let config = if node.starts_with(PRIVATE_PREFIX) {
                None
            } else {
                self.store
                    .pep_node(self.owner, &node)
                    .await
                    .map_err(|e| store_failed(iq, &e))?
            };
            let Some(config) = config else {
                return Err(fail(iq, StanzaError::ItemNotFound, "no such node"));
            };
            if config.access == PepAccess::Owner {
                self.own_only_read()?;
            }
            self.store
                .pep_items(self.owner, &node)
                .await
                .map_err(|e| store_failed(iq, &e))?
                .into_iter()
                .filter_map(|i| parse_payload(&i.payload).map(|p| (i.id, p)))
                .collect()
        };
        let mut chosen: Vec<(String, Element)> = stored
            .into_iter()
            .filter(|(id, _)| wanted.is_empty() || wanted.contains(&id.as_str()))
            .collect();
        if let Some(max) = max {
            let skip = chosen.len().saturating_sub(max);
            chosen.drain(..skip);
        }
        let mut out = Element::new("items", PUBSUB).attr("node", node);
        for (id, payload) in chosen {
            out = out.child(Element::new("item", PUBSUB).attr("id", id).child(payload));
        }
        Ok(self
            .result()
            .child(Element::new("pubsub", PUBSUB).child(out)))
    }

    fn own_only_read(&self) -> Result<(), Element> {
        if self.is_owner() {
            Ok(())
        } else {
            Err(fail_pubsub(
                self.iq,
                StanzaError::NotAllowed,
                "closed-node",
                "only the account's owner may read this node",
            ))
        }
    }

    async fn retract(&self, retract: &Element) -> Reply {
        let iq = self.iq;
        self.own_only()?;
        let node = node_of(iq, retract)?;
        let Some(id) = retract
            .get_child("item", PUBSUB)
            .and_then(|i| i.get_attr("id"))
        else {
            return Err(fail_pubsub(
                iq,
                StanzaError::BadRequest,
                "item-required",
                "name the item to retract",
            ));
        };
        if node == LEGACY_BOOKMARKS || node.starts_with(PRIVATE_PREFIX) {
            return Err(fail(
                iq,
                StanzaError::FeatureNotImplemented,
                "publish the whole storage element instead",
            ));
        }
        let removed = self
            .store
            .pep_retract(self.owner, &node, id)
            .await
            .map_err(|e| store_failed(iq, &e))?;
        if !removed {
            return Err(fail(iq, StanzaError::ItemNotFound, "no such item"));
        }
        self.notify(
            &node,
            Element::new("retract", PUBSUB_EVENT).attr("id", id),
            PepChange::Retracted {
                item: id.to_owned(),
            },
        )
        .await;
        Ok(self.result())
    }

    async fn delete(&self, delete: &Element) -> Reply {
        let iq = self.iq;
        self.own_only()?;
        let mut node = node_of(iq, delete)?;
        if node == LEGACY_BOOKMARKS {
            node = BOOKMARKS.to_owned();
        }
        if node.starts_with(PRIVATE_PREFIX) {
            return Err(fail(iq, StanzaError::ItemNotFound, "no such node"));
        }
        let removed = self
            .store
            .pep_delete(self.owner, &node)
            .await
            .map_err(|e| store_failed(iq, &e))?;
        if !removed {
            return Err(fail(iq, StanzaError::ItemNotFound, "no such node"));
        }
        tell(
            &self.state.router,
            self.owner,
            &Element::new("event", PUBSUB_EVENT)
                .child(Element::new("delete", PUBSUB_EVENT).attr("node", node.clone())),
        );
        self.announce(&node, PepChange::Deleted).await;
        Ok(self.result())
    }

    /// XEP-0054: the account's vCard, read by any user of this server (avatars in rooms),
    /// empty when none was set.
    async fn vcard_get(&self) -> Reply {
        let card = self
            .store
            .pep_items(self.owner, VCARD_NODE)
            .await
            .map_err(|e| store_failed(self.iq, &e))?
            .pop()
            .and_then(|i| parse_payload(&i.payload))
            .unwrap_or_else(|| Element::new("vCard", VCARD));
        Ok(self.result().child(card))
    }

    /// XEP-0054: the owner replaces their vCard (at most [`PAYLOAD_BYTES_MAX`], a photo
    /// included).
    async fn vcard_set(&self, card: &Element) -> Reply {
        if !self.is_owner() {
            return Err(fail(
                self.iq,
                StanzaError::Forbidden,
                "only the account's owner may set its vCard",
            ));
        }
        let config = PepNode {
            access: PepAccess::Users,
            max_items: 1,
        };
        self.put_private(VCARD_NODE, card, config).await?;
        Ok(self.result())
    }

    /// XEP-0049: one element per (name, namespace), the owner's only; XEP-0048 bookmarks are
    /// the XEP-0402 items seen as one `<storage/>`.
    async fn private(&self, ty: &str, query: &Element) -> Reply {
        let iq = self.iq;
        if !self.is_owner() {
            return Err(fail(
                iq,
                StanzaError::Forbidden,
                "private XML is its owner's only",
            ));
        }
        let mut children = query.elements();
        let (Some(el), None) = (children.next(), children.next()) else {
            return Err(fail(
                iq,
                StanzaError::BadRequest,
                "name exactly one element (XEP-0049)",
            ));
        };
        if el.ns.starts_with("jabber:") || el.ns.is_empty() {
            return Err(fail(
                iq,
                StanzaError::NotAcceptable,
                "jabber: namespaces are not private storage (XEP-0049)",
            ));
        }
        let node = format!("{PRIVATE_PREFIX}{}#{}", el.ns, el.name);
        match ty {
            "get" => {
                let stored = if el.is("storage", LEGACY_BOOKMARKS) {
                    self.legacy_storage().await?
                } else {
                    self.store
                        .pep_items(self.owner, &node)
                        .await
                        .map_err(|e| store_failed(iq, &e))?
                        .pop()
                        .and_then(|i| parse_payload(&i.payload))
                        .unwrap_or_else(|| Element::new(el.name.clone(), el.ns.clone()))
                };
                Ok(self
                    .result()
                    .child(Element::new("query", PRIVATE).child(stored)))
            }
            "set" => {
                if el.is("storage", LEGACY_BOOKMARKS) {
                    self.replace_bookmarks(el).await?;
                } else {
                    let config = PepNode {
                        access: PepAccess::Owner,
                        max_items: 1,
                    };
                    self.put_private(&node, el, config).await?;
                }
                Ok(self.result())
            }
            _ => Err(fail(iq, StanzaError::BadRequest, "get or set")),
        }
    }

    async fn put_private(&self, node: &str, el: &Element, config: PepNode) -> Result<(), Element> {
        let iq = self.iq;
        let xml = el.to_xml_in("");
        if xml.len() > PAYLOAD_BYTES_MAX {
            return Err(fail(
                iq,
                StanzaError::NotAcceptable,
                &format!("private XML holds at most {PAYLOAD_BYTES_MAX} bytes per element"),
            ));
        }
        let nodes = self
            .store
            .pep_nodes(self.owner)
            .await
            .map_err(|e| store_failed(iq, &e))?;
        if !nodes.iter().any(|n| n == node) && nodes.len() >= NODES_MAX {
            return Err(fail(
                iq,
                StanzaError::ResourceConstraint,
                &format!("an account has at most {NODES_MAX} stored elements and nodes"),
            ));
        }
        let item = PepItem {
            id: "current".to_owned(),
            payload: xml,
            at: crate::datetime::now(),
        };
        self.store
            .pep_publish(self.owner, node, config, item)
            .await
            .map_err(|e| store_failed(iq, &e))
    }

    /// The XEP-0402 bookmarks as XEP-0048's `<storage/>`.
    async fn legacy_storage(&self) -> Result<Element, Element> {
        let items = self
            .store
            .pep_items(self.owner, BOOKMARKS)
            .await
            .map_err(|e| store_failed(self.iq, &e))?;
        let mut storage = Element::new("storage", LEGACY_BOOKMARKS);
        for item in items {
            if let Some(conference) = parse_payload(&item.payload) {
                storage = storage.child(to_legacy(&item.id, &conference));
            }
        }
        Ok(storage)
    }

    /// XEP-0048's `<storage/>` written: the XEP-0402 items become its conferences (a changed
    /// or new one published, a missing one retracted; what XEP-0048 cannot say, such as
    /// `<extensions/>`, kept from the item it replaces).
    async fn replace_bookmarks(&self, storage: &Element) -> Result<(), Element> {
        let iq = self.iq;
        let current = self
            .store
            .pep_items(self.owner, BOOKMARKS)
            .await
            .map_err(|e| store_failed(iq, &e))?;
        let mut wanted: Vec<(String, Element)> = Vec::new();
        for c in storage
            .elements()
            .filter(|e| e.is("conference", LEGACY_BOOKMARKS))
        {
            let Some(jid) = c.get_attr("jid").filter(|j| j.contains('@')) else {
                continue;
            };
            let before = current
                .iter()
                .find(|i| i.id == jid)
                .and_then(|i| parse_payload(&i.payload));
            wanted.push((jid.to_owned(), from_legacy(c, before.as_ref())));
        }
        if wanted.len() > PEP_ITEMS_MAX as usize {
            return Err(fail(
                iq,
                StanzaError::NotAcceptable,
                &format!("at most {PEP_ITEMS_MAX} bookmarks"),
            ));
        }
        for (jid, conference) in &wanted {
            let unchanged = current
                .iter()
                .any(|i| i.id == *jid && i.payload == conference.to_xml_in(""));
            if !unchanged {
                self.put(BOOKMARKS, jid, conference, None).await?;
            }
        }
        for item in &current {
            if !wanted.iter().any(|(jid, _)| *jid == item.id) {
                self.store
                    .pep_retract(self.owner, BOOKMARKS, &item.id)
                    .await
                    .map_err(|e| store_failed(iq, &e))?;
                self.notify(
                    BOOKMARKS,
                    Element::new("retract", PUBSUB_EVENT).attr("id", item.id.clone()),
                    PepChange::Retracted {
                        item: item.id.clone(),
                    },
                )
                .await;
            }
        }
        Ok(())
    }

    /// An event about `node` to the owner's sessions on this server, and the change to the
    /// other servers of a pool.
    async fn notify(&self, node: &str, what: Element, change: PepChange) {
        tell(&self.state.router, self.owner, &items_event(node, what));
        self.announce(node, change).await;
    }

    /// Tells the other servers of the pool (none when standalone). A failure costs only the
    /// event there: the change is committed, and those sessions read it at their next look.
    async fn announce(&self, node: &str, change: PepChange) {
        let Some(server) = &self.state.pool_server else {
            return;
        };
        let event = PepEvent {
            server: server.clone(),
            owner: self.owner.to_owned(),
            node: node.to_owned(),
            change,
        };
        if let Err(e) = self.store.pep_announce(&event).await {
            tracing::warn!(error = %e, owner = %self.owner, node, "cannot tell the pool of a PEP change; the owner's sessions on other servers see it at their next read");
        }
    }
}

/// `<event><items node=…>what</items></event>`.
fn items_event(node: &str, what: Element) -> Element {
    Element::new("event", PUBSUB_EVENT).child(
        Element::new("items", PUBSUB_EVENT)
            .attr("node", node)
            .child(what),
    )
}

/// `event` to every session of `owner` on this server.
fn tell(router: &crate::router::Router, owner: &str, event: &Element) {
    for full in router.resources(owner) {
        let message = Element::new("message", ns::CLIENT)
            .attr("type", "headline")
            .attr("from", owner)
            .attr("to", full)
            .child(event.clone());
        router.deliver(message);
    }
}

/// Another server of the pool changed a node of `change.owner`: its sessions here get the
/// event the sessions there got. A published item is read from the store (it may have
/// changed again meanwhile: then the newer one is shown, and its own event follows).
pub async fn tell_remote_change(
    store: &dyn Store,
    router: &crate::router::Router,
    own_server: Option<&str>,
    change: PepEvent,
) {
    if own_server == Some(change.server.as_str()) || router.resources(&change.owner).is_empty() {
        return;
    }
    let event = match &change.change {
        PepChange::Published { item } => {
            let items = match store.pep_items(&change.owner, &change.node).await {
                Ok(items) => items,
                Err(e) => {
                    tracing::warn!(error = %e, owner = %change.owner, "cannot read a PEP item another server published");
                    return;
                }
            };
            let Some(payload) = items
                .into_iter()
                .find(|i| i.id == *item)
                .and_then(|i| parse_payload(&i.payload))
            else {
                return; // retracted again meanwhile: its retraction follows
            };
            items_event(
                &change.node,
                Element::new("item", PUBSUB_EVENT)
                    .attr("id", item.as_str())
                    .child(payload),
            )
        }
        PepChange::Retracted { item } => items_event(
            &change.node,
            Element::new("retract", PUBSUB_EVENT).attr("id", item.as_str()),
        ),
        PepChange::Deleted => Element::new("event", PUBSUB_EVENT)
            .child(Element::new("delete", PUBSUB_EVENT).attr("node", change.node.as_str())),
    };
    tell(router, &change.owner, &event);
}

fn node_of(iq: &Element, el: &Element) -> Result<String, Element> {
    match el
        .get_attr("node")
        .filter(|n| !n.is_empty() && n.len() <= 256)
    {
        Some(node) => Ok(node.to_owned()),
        None => Err(fail_pubsub(
            iq,
            StanzaError::BadRequest,
            "nodeid-required",
            "name the node (at most 256 bytes)",
        )),
    }
}

fn parse_payload(xml: &str) -> Option<Element> {
    Element::parse(xml.as_bytes(), "").ok()
}

/// XEP-0490's node: one read position per conversation, as many as bookmarks.
pub const DISPLAYED: &str = "urn:xmpp:mds:displayed:0";

/// The most items `node` may keep.
fn items_cap(node: &str) -> u32 {
    if node == BOOKMARKS || node == DISPLAYED {
        PEP_ITEMS_MAX
    } else {
        ITEMS_MAX_OTHER
    }
}

/// A new node's configuration when the publication says nothing: bookmarks are the owner's
/// and keep every room; other nodes are open and keep the last item (XEP-0163).
fn default_config(node: &str) -> PepNode {
    if node == BOOKMARKS || node == DISPLAYED {
        PepNode {
            access: PepAccess::Owner,
            max_items: PEP_ITEMS_MAX,
        }
    } else {
        PepNode {
            access: PepAccess::Users,
            max_items: 1,
        }
    }
}

/// What a publication's publish-options ask for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    access: Option<PepAccess>,
    /// `None`: not given; `Some(None)`: "max".
    max_items: Option<Option<u32>>,
}

impl Options {
    fn apply(&self, base: PepNode, cap: u32) -> PepNode {
        PepNode {
            access: self.access.unwrap_or(base.access),
            max_items: match self.max_items {
                None => base.max_items.min(cap),
                Some(None) => cap,
                Some(Some(n)) => n.clamp(1, cap),
            },
        }
    }
}

/// The publish-options form (XEP-0060 §7.1.5), if any. Options pchat cannot honour are
/// refused (`precondition-not-met`); the rest (persistence, sending the last item) are what
/// pchat does anyway.
fn publish_options(iq: &Element, pubsub: &Element) -> Result<Option<Options>, Element> {
    let Some(form) = pubsub
        .get_child("publish-options", PUBSUB)
        .and_then(|o| o.get_child("x", ns::DATA_FORMS))
    else {
        return Ok(None);
    };
    let refuse = |text: &str| fail_pubsub(iq, StanzaError::Conflict, "precondition-not-met", text);
    let mut options = Options::default();
    for field in form.elements().filter(|e| e.is("field", ns::DATA_FORMS)) {
        let value = field
            .child_text("value", ns::DATA_FORMS)
            .unwrap_or_default();
        match field.get_attr("var").unwrap_or_default() {
            "pubsub#access_model" => {
                options.access = Some(PepAccess::parse(&value).ok_or_else(|| {
                    refuse(&format!(
                        "access model {value:?}: pchat offers whitelist, open, presence and roster"
                    ))
                })?);
            }
            "pubsub#max_items" => {
                options.max_items = Some(if value == "max" {
                    None
                } else {
                    Some(value.parse().map_err(|_| {
                        refuse(&format!("max_items {value:?} is not a number or \"max\""))
                    })?)
                });
            }
            "pubsub#persist_items" if matches!(value.as_str(), "0" | "false") => {
                return Err(refuse("pchat keeps every published item (persist_items)"));
            }
            _ => {}
        }
    }
    Ok(Some(options))
}

/// A XEP-0402 conference as XEP-0048's `<conference jid/>`.
fn to_legacy(jid: &str, c: &Element) -> Element {
    let mut out = Element::new("conference", LEGACY_BOOKMARKS).attr("jid", jid);
    if let Some(name) = c.get_attr("name") {
        out = out.attr("name", name);
    }
    if matches!(c.get_attr("autojoin"), Some("true" | "1")) {
        out = out.attr("autojoin", "true");
    }
    for child in ["nick", "password"] {
        if let Some(text) = c.child_text(child, BOOKMARKS) {
            out = out.child(Element::new(child, LEGACY_BOOKMARKS).text(text));
        }
    }
    out
}

/// XEP-0048's `<conference jid/>` as a XEP-0402 conference, keeping `<extensions/>` of the
/// bookmark it replaces.
fn from_legacy(c: &Element, before: Option<&Element>) -> Element {
    let mut out = Element::new("conference", BOOKMARKS);
    if let Some(name) = c.get_attr("name") {
        out = out.attr("name", name);
    }
    if matches!(c.get_attr("autojoin"), Some("true" | "1")) {
        out = out.attr("autojoin", "true");
    }
    for child in ["nick", "password"] {
        if let Some(text) = c.child_text(child, LEGACY_BOOKMARKS) {
            out = out.child(Element::new(child, BOOKMARKS).text(text));
        }
    }
    if let Some(ext) = before.and_then(|b| b.get_child("extensions", BOOKMARKS)) {
        out = out.child(ext.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookmarks_convert_both_ways_and_keep_extensions() {
        let modern = Element::new("conference", BOOKMARKS)
            .attr("name", "Lobby")
            .attr("autojoin", "1")
            .child(Element::new("nick", BOOKMARKS).text("cat"))
            .child(Element::new("extensions", BOOKMARKS).child(Element::new("x", "urn:example")));
        let legacy = to_legacy("lobby@conference.localhost", &modern);
        assert_eq!(legacy.get_attr("jid"), Some("lobby@conference.localhost"));
        assert_eq!(legacy.get_attr("autojoin"), Some("true"));
        assert_eq!(
            legacy.child_text("nick", LEGACY_BOOKMARKS).as_deref(),
            Some("cat")
        );
        let back = from_legacy(&legacy, Some(&modern));
        assert_eq!(back.get_attr("name"), Some("Lobby"));
        assert_eq!(back.get_attr("autojoin"), Some("true"));
        assert_eq!(back.child_text("nick", BOOKMARKS).as_deref(), Some("cat"));
        assert!(back.get_child("extensions", BOOKMARKS).is_some());
        let plain = from_legacy(&Element::new("conference", LEGACY_BOOKMARKS), None);
        assert_eq!(plain.get_attr("autojoin"), None);
    }

    #[test]
    fn publish_options_are_applied_within_the_cap() {
        let base = default_config("urn:xmpp:avatar:data");
        let o = Options {
            access: Some(PepAccess::Owner),
            max_items: Some(None),
        };
        assert_eq!(
            o.apply(base, ITEMS_MAX_OTHER),
            PepNode {
                access: PepAccess::Owner,
                max_items: ITEMS_MAX_OTHER
            }
        );
        let o = Options {
            access: None,
            max_items: Some(Some(100_000)),
        };
        assert_eq!(
            o.apply(default_config(BOOKMARKS), PEP_ITEMS_MAX).max_items,
            PEP_ITEMS_MAX
        );
        assert_eq!(Options::default().apply(base, ITEMS_MAX_OTHER), base);
    }
}
