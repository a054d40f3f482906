//! C2SP signed notes for checkpoints: signer keys as `PRIVATE+KEY+name+hash+base64(0x01‖seed)`,
//! their verifier text, and the checkpoint note (origin, size, root) signed with Ed25519.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair};

const ALG_ED25519: u8 = 0x01;
const PRIVATE_PREFIX: &str = "PRIVATE+KEY+";

pub struct SignerKey {
    pub name: String,
    pub hash: u32,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SignerKey {
    // Never the seed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignerKey({}+{:08x})", self.name, self.hash)
    }
}

/// SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)[..4] as a big-endian u32.
pub fn key_hash(name: &str, public: &[u8]) -> u32 {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    c.update(name.as_bytes());
    c.update(b"\n");
    c.update(&[ALG_ED25519]);
    c.update(public);
    let d = c.finish();
    u32::from_be_bytes([d.as_ref()[0], d.as_ref()[1], d.as_ref()[2], d.as_ref()[3]])
}

impl SignerKey {
    /// Parses the signer key text `phigate audit keygen` writes; the embedded hash must match.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text.trim().strip_prefix(PRIVATE_PREFIX).ok_or("not an audit signing key (it must start with PRIVATE+KEY+)")?;
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(hash_hex), Some(blob)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("not an audit signing key (expected PRIVATE+KEY+NAME+HASH+KEY)".into());
        };
        let hash = (hash_hex.len() == 8).then(|| u32::from_str_radix(hash_hex, 16).ok()).flatten().ok_or("the signing key's hash is malformed")?;
        let raw = B64.decode(blob).map_err(|_| "the signing key's key part is not base64")?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err("the signing key is not an Ed25519 key".into());
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(&raw[1..]).map_err(|_| "the signing key's seed is invalid")?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err("the signing key's name is invalid".into());
        }
        let key = SignerKey { name: name.to_string(), hash, pair };
        if key_hash(name, key.public()) != hash {
            return Err("the signing key's hash does not match its key: the file is damaged".into());
        }
        Ok(key)
    }

    pub fn public(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// `<name>+<hash hex>+<base64(0x01 ‖ public key)>`.
    pub fn verifier_text(&self) -> String {
        let mut blob = vec![ALG_ED25519];
        blob.extend_from_slice(self.public());
        format!("{}+{:08x}+{}", self.name, self.hash, B64.encode(blob))
    }

    /// `name+hash`: how a signature line names its key.
    pub fn id(&self) -> String {
        format!("{}+{:08x}", self.name, self.hash)
    }

    /// The signature line for `body`: `— <name> <base64(hash ‖ signature)>\n`.
    fn signature_line(&self, body: &[u8]) -> String {
        let mut blob = self.hash.to_be_bytes().to_vec();
        blob.extend_from_slice(self.pair.sign(body).as_ref());
        format!("\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

/// The checkpoint body the signatures cover: origin, size and base64 root, one per line.
pub fn checkpoint_body(origin: &str, size: u64, root: &[u8; 32]) -> String {
    format!("{origin}\n{size}\n{}\n", B64.encode(root))
}

/// The signed note: body, a blank line, then one signature line per key (in the order given).
pub fn sign_checkpoint(origin: &str, size: u64, root: &[u8; 32], keys: &[&SignerKey]) -> String {
    let body = checkpoint_body(origin, size, root);
    let mut note = format!("{body}\n");
    for k in keys {
        note.push_str(&k.signature_line(body.as_bytes()));
    }
    note
}

/// The key ids (`name+hash`) that signed a note, in order.
pub fn note_signers(note: &str) -> Vec<String> {
    let Some((_, sigs)) = note.split_once("\n\n") else { return vec![] };
    sigs.lines()
        .filter_map(|l| {
            let mut p = l.strip_prefix("\u{2014} ")?.splitn(2, ' ');
            let (name, blob) = (p.next()?, p.next()?);
            let raw = B64.decode(blob).ok()?;
            (raw.len() >= 4).then(|| format!("{name}+{:08x}", u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]])))
        })
        .collect()
}

pub fn b64(data: &[u8]) -> String {
    B64.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ED25519};

    fn key(name: &str, seed: [u8; 32]) -> String {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        let h = key_hash(name, pair.public_key().as_ref());
        let mut blob = vec![1u8];
        blob.extend_from_slice(&seed);
        format!("PRIVATE+KEY+{name}+{h:08x}+{}", B64.encode(blob))
    }

    #[test]
    fn parses_signs_and_verifies() {
        let k = SignerKey::parse(&key("example.org/gw", [7; 32])).unwrap();
        assert!(k.verifier_text().starts_with(&format!("example.org/gw+{:08x}+", k.hash)));
        let note = sign_checkpoint("example.org/gw", 5, &[9; 32], &[&k]);
        let (body, sig) = note.split_once("\n\n").unwrap();
        assert_eq!(format!("{body}\n"), checkpoint_body("example.org/gw", 5, &[9; 32]));
        let raw = B64.decode(sig.trim_end().rsplit(' ').next().unwrap()).unwrap();
        assert_eq!(&raw[..4], &k.hash.to_be_bytes());
        UnparsedPublicKey::new(&ED25519, k.public()).verify(format!("{body}\n").as_bytes(), &raw[4..]).unwrap();
        assert_eq!(note_signers(&note), vec![k.id()]);
        assert!(format!("{k:?}").contains("example.org/gw"));
    }

    #[test]
    fn rejects_damaged_keys() {
        let good = key("n", [3; 32]);
        assert!(SignerKey::parse(&good.replace("PRIVATE+KEY+", "")).is_err());
        let mut bad = good.clone();
        bad.replace_range(14..15, if &good[14..15] == "0" { "1" } else { "0" });
        assert!(SignerKey::parse(&bad).is_err());
        assert!(SignerKey::parse("PRIVATE+KEY+n+00000000+AA==").is_err());
    }
}
