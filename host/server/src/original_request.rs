//! The request a proxy asks about, as any protocol delivers it, and the rules that hold for
//! every protocol: how a request target splits, which paths are ambiguous, how the bearer
//! token is found.

use sandgate_runtime::bindings::sandgate::policy::types::Header;

/// The request the proxy asks about.
pub struct OriginalRequest {
    /// Method, uppercase.
    pub method: String,
    /// `http` or `https`.
    pub scheme: String,
    /// Host, lowercase.
    pub host: String,
    /// Path, starting with `/`.
    pub path: String,
    /// Query without `?`.
    pub query: Option<String>,
    /// Headers, lowercase names.
    pub headers: Vec<Header>,
    /// Client address.
    pub peer: String,
    /// Body, if the proxy sent one (already capped).
    pub body: Option<Vec<u8>>,
}

/// What the `Authorization` header holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Bearer<'a> {
    /// No `Authorization` header.
    None,
    /// A header that is not `Bearer <token>`.
    Malformed,
    /// The token.
    Token(&'a str),
}

impl OriginalRequest {
    /// Split a request target into its path (always starting with `/`) and query.
    pub fn split_target(target: &str) -> (String, Option<String>) {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (target, None),
        };
        let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
        (path, query)
    }

    /// Whether the path could mean something else to the upstream than to the router: dot
    /// segments, empty segments, or percent-encoded dots and slashes. Such requests are
    /// denied rather than routed by a spelling the upstream will normalise away.
    pub(crate) fn is_ambiguous_path(&self) -> bool {
        let path = self.path.as_bytes();
        self.path.contains("//")
            || self.path.contains('\\')
            || self.path.split('/').any(|segment| segment == "." || segment == "..")
            || path.windows(3).any(|w| [b"%2e", b"%2f", b"%5c"].iter().any(|t| w.eq_ignore_ascii_case(*t)))
    }

    /// The first value of header `name` (lowercase).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.name == name).map(|h| h.value.as_str())
    }

    /// The bearer token: the scheme is case-insensitive, the token trimmed.
    pub(crate) fn bearer(&self) -> Bearer<'_> {
        let Some(value) = self.header("authorization") else { return Bearer::None };
        bearer_token(value)
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
pub(crate) fn bearer_token(value: &str) -> Bearer<'_> {
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Bearer::Token(token.trim())
        }
        _ => Bearer::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_path(path: &str) -> OriginalRequest {
        OriginalRequest {
            method: "GET".into(),
            scheme: "http".into(),
            host: "app".into(),
            path: path.into(),
            query: None,
            headers: Vec::new(),
            peer: String::new(),
            body: None,
        }
    }

    #[test]
    fn targets_split_into_a_rooted_path_and_a_query() {
        assert_eq!(OriginalRequest::split_target("/a/b?x=1&y"), ("/a/b".into(), Some("x=1&y".into())));
        assert_eq!(OriginalRequest::split_target("a"), ("/a".into(), None));
        assert_eq!(OriginalRequest::split_target(""), ("/".into(), None));
        assert_eq!(OriginalRequest::split_target("/p?"), ("/p".into(), Some(String::new())));
    }

    #[test]
    fn dot_segments_empty_segments_and_encoded_separators_are_ambiguous() {
        for path in
            ["/a/../admin", "/a/./b", "//admin", "/a//b", "/a\\b", "/%2e%2e/admin", "/a%2Fb", "/a%5cb", "/%2E/x"]
        {
            assert!(with_path(path).is_ambiguous_path(), "{path}");
        }
        for path in ["/", "/api/orders/7", "/a.b/c..d", "/%41"] {
            assert!(!with_path(path).is_ambiguous_path(), "{path}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_anything_else_is_malformed() {
        assert_eq!(bearer_token("Bearer abc"), Bearer::Token("abc"));
        assert_eq!(bearer_token("bearer  abc "), Bearer::Token("abc"));
        assert_eq!(bearer_token("BEARER abc"), Bearer::Token("abc"));
        assert_eq!(bearer_token("Basic abc"), Bearer::Malformed);
        assert_eq!(bearer_token("Bearer"), Bearer::Malformed);
        assert_eq!(bearer_token("Bearer   "), Bearer::Malformed);
        let mut request = with_path("/");
        assert_eq!(request.bearer(), Bearer::None);
        request.headers.push(Header { name: "authorization".into(), value: "Token x".into() });
        assert_eq!(request.bearer(), Bearer::Malformed);
    }
}
