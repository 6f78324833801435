//! `oci://HOST[:PORT]/REPOSITORY:TAG` and `oci://HOST[:PORT]/REPOSITORY@sha256:HEX`: how a
//! policy module in a registry is named wherever a module is named.

use std::fmt;
use std::str::FromStr;

/// The scheme that marks a module reference as an OCI artifact.
pub const SCHEME: &str = "oci://";

/// A module in an OCI registry: a registry host, a repository, and a tag or a digest (or both:
/// then the digest decides and the tag is only a label).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModuleRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

/// Why a string is not a module reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not an OCI module reference: {reason}")]
pub struct BadReference {
    input: String,
    reason: String,
}

impl ModuleRef {
    /// Whether `text` names an OCI module (starts with `oci://`), as opposed to a file.
    pub fn is_oci(text: &str) -> bool {
        text.starts_with(SCHEME)
    }

    /// The registry host, with its port if one was given.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference names one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The manifest digest (`sha256:…`), if the reference names one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The same repository pinned to the manifest `digest`, without the tag.
    pub fn pinned(&self, digest: &str) -> ModuleRef {
        ModuleRef { tag: None, digest: Some(digest.to_owned()), ..self.clone() }
    }

    /// The same repository at `tag`.
    pub fn with_tag(&self, tag: &str) -> ModuleRef {
        ModuleRef { tag: Some(tag.to_owned()), digest: None, ..self.clone() }
    }

    /// The reference without the `oci://` scheme, as registries and `oci-client` spell it.
    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (Some(tag), Some(digest)) => oci_client::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone(),
                digest.clone(),
            ),
            (_, Some(digest)) => {
                oci_client::Reference::with_digest(self.registry.clone(), self.repository.clone(), digest.clone())
            }
            (tag, None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone().unwrap_or_default(),
            ),
        }
    }

    /// Whether the registry is this machine (`localhost`, `127.0.0.0/8`, `[::1]`).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

/// Whether `host[:port]` names this machine.
pub fn is_loopback_host(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl FromStr for ModuleRef {
    type Err = BadReference;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| BadReference { input: input.to_owned(), reason: reason.to_owned() };
        let rest = input.strip_prefix(SCHEME).ok_or_else(|| bad("it does not start with `oci://`"))?;
        let (registry, path) =
            rest.split_once('/').ok_or_else(|| bad("expected `oci://HOST/REPOSITORY:TAG` or `…@sha256:DIGEST`"))?;
        if !valid_registry(registry) {
            return Err(bad("the registry host is not a host name or address with an optional port"));
        }
        if !names_a_host(registry) {
            return Err(bad(
                "the first component must name the registry host (with a `.`, a port, `localhost` or an address): `oci://HOST/REPOSITORY:TAG`",
            ));
        }
        let registry = registry.to_ascii_lowercase();
        let (name, digest) = match path.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (path, None),
        };
        // A tag follows the last `:` after the last `/`.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if !valid_repository(repository) {
            return Err(bad(
                "the repository must be lowercase path components of [a-z0-9] joined by `.`, `_`, `__` or `-`",
            ));
        }
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(bad("a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with `.` or `-`"));
        }
        if let Some(digest) = digest
            && !valid_digest(digest)
        {
            return Err(bad("a digest is `sha256:` and 64 lowercase hex digits"));
        }
        if tag.is_none() && digest.is_none() {
            return Err(bad("it names no tag or digest: add `:TAG` or `@sha256:DIGEST` (no implicit `latest`)"));
        }
        Ok(ModuleRef {
            registry,
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        })
    }
}

impl fmt::Display for ModuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn valid_registry(registry: &str) -> bool {
    let (host_ok, port) = match registry.strip_prefix('[') {
        Some(rest) => {
            let Some((ip, after)) = rest.split_once(']') else { return false };
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => return false,
                },
            };
            (ip.parse::<std::net::Ipv6Addr>().is_ok(), port)
        }
        None => {
            let (host, port) = match registry.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (registry, None),
            };
            let host_ok = !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            (host_ok, port)
        }
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// Whether `registry` can only be a host (`registry.example`, `name:5000`, `localhost`, an
/// address), not the first component of a repository path (`oci://library/rbac` is refused
/// rather than sent to a host named `library`).
fn names_a_host(registry: &str) -> bool {
    registry.contains(['.', ':', '['])
        || registry.eq_ignore_ascii_case("localhost")
        || registry.parse::<std::net::IpAddr>().is_ok()
}

fn valid_repository(repository: &str) -> bool {
    !repository.is_empty()
        && repository.len() <= 255
        && repository.split('/').all(|component| {
            let bytes = component.as_bytes();
            let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            !bytes.is_empty()
                && bytes.first().is_some_and(alnum)
                && bytes.last().is_some_and(alnum)
                && bytes.iter().all(|b| alnum(b) || b"._-".contains(b))
                && !component.contains("..")
                && !component.contains("___")
        })
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Whether `digest` is `sha256:` and 64 lowercase hex digits: the only digests Sandgate
/// accepts, so every digest it pins has one spelling.
pub fn valid_digest(digest: &str) -> bool {
    digest
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn tags_and_digests_parse_and_print_back() {
        for text in [
            "oci://127.0.0.1:5000/sandgate/rbac:v1".to_owned(),
            format!("oci://registry.example/policies/rbac@{D}"),
            format!("oci://localhost:5000/rbac:v2@{D}"),
            "oci://[::1]:5000/a/b/c:latest".to_owned(),
        ] {
            let parsed: ModuleRef = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        let r: ModuleRef = "oci://localhost:5000/team/rbac:v1".parse().unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag(), r.digest()),
            ("localhost:5000", "team/rbac", Some("v1"), None)
        );
        assert_eq!(r.pinned(D).to_string(), format!("oci://localhost:5000/team/rbac@{D}"));
        assert!(r.is_loopback());
        assert!(!"oci://registry.example/r:v".parse::<ModuleRef>().unwrap().is_loopback());
        assert!("oci://[::1]:5000/r:v".parse::<ModuleRef>().unwrap().is_loopback());
        assert!("oci://127.0.0.2/r:v".parse::<ModuleRef>().unwrap().is_loopback());
        // One spelling of a host, whatever case it was written in.
        assert_eq!("oci://Registry.Example/r:v".parse::<ModuleRef>().unwrap().registry(), "registry.example");
        assert_eq!("oci://localhost/r:v".parse::<ModuleRef>().unwrap().registry(), "localhost");
    }

    #[test]
    fn bad_references_say_why() {
        for (text, why) in [
            ("registry.example/rbac:v1", "does not start with `oci://`"),
            ("oci://registry.example", "expected `oci://HOST"),
            ("oci://registry.example/rbac", "no tag or digest"),
            ("oci://registry.example/RBAC:v1", "lowercase"),
            ("oci://registry.example/a/../b:v1", "lowercase"),
            ("oci://registry.example/rbac:-v1", "a tag is"),
            ("oci://registry.example/rbac@sha256:abc", "a digest is"),
            ("oci://registry.example/rbac@sha512:abc", "a digest is"),
            ("oci://reg istry/rbac:v1", "registry host"),
            ("oci://registry.example:port/rbac:v1", "registry host"),
            ("oci:///rbac:v1", "registry host"),
            ("oci://library/rbac:v1", "must name the registry host"),
        ] {
            let error = text.parse::<ModuleRef>().unwrap_err().to_string();
            assert!(error.contains(why), "{text}: {error}");
            assert!(error.contains(&format!("`{text}`")), "{error}");
        }
    }
}
