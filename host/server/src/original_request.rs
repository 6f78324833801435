//! The request a proxy asks about, as any protocol delivers it, and the rules that hold for
//! every protocol: how a request target splits, which paths are ambiguous, how the bearer
//! token is found.

use sandgate_runtime::bindings::sandgate::policy::types::Header;

/// The request the proxy asks about.
#[derive(Default)]
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
    /// The client's `x-request-id`, bounded; set by [`Authorizer::decide`](crate::Authorizer::decide)
    /// and only logged.
    pub client_request_id: Option<String>,
    /// Trace context the transport carried beside the request (gRPC metadata: `traceparent`,
    /// `tracestate`, B3), consulted before the request's own headers.
    pub trace_metadata: Vec<Header>,
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

    /// The first value of header `name` (lowercase).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.name == name).map(|h| h.value.as_str())
    }

    /// The bearer token: the scheme is case-insensitive, the token trimmed.
    pub(crate) fn bearer(&self) -> Bearer<'_> {
        bearer_of(&self.headers)
    }
}

/// Why a path has no canonical form: it could mean something else to the upstream (or to a
/// server behind it) than to Sandgate's router and policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmbiguousPath {
    /// Not starting with `/`.
    #[error("the path does not start with `/`")]
    NotAbsolute,
    /// A `;` path parameter (Tomcat, Spring and Jetty strip them and resolve what is left).
    #[error("the path has a `;` parameter")]
    Parameter,
    /// A control byte, a raw non-ASCII byte, a backslash, or another byte a path may not hold
    /// unencoded (a space, `#`, `"<>[]^`{|}`).
    #[error("the path has a byte a path may not hold unencoded")]
    Byte,
    /// `%` not followed by two hex digits.
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    /// An encoded `%` (double encoding), NUL, control byte, backslash or reserved character.
    #[error("the path percent-encodes `%`, NUL, a control byte, `\\` or a reserved character")]
    EncodedDelimiter,
    /// A `.` or `..` segment, possibly percent-encoded.
    #[error("the path has a dot segment")]
    DotSegment,
    /// `//` anywhere.
    #[error("the path has an empty segment")]
    EmptySegment,
    /// Percent-encoded bytes that are not UTF-8: an overlong form (`%C0%AE`, a `.` to a
    /// decoder that accepts it), a lone continuation byte, an encoded surrogate, a Latin-1 byte.
    #[error("the path percent-encodes bytes that are not UTF-8")]
    NotUtf8,
    /// A non-ASCII character that Unicode compatibility normalization (NFKC) or case mapping
    /// turns into ASCII: fullwidth forms (`%EF%BC%8F`, `／`), `K` KELVIN SIGN, `İ`, `ſ`, `²`;
    /// an invisible one some upstreams drop (soft hyphen, zero-width space); a look-alike of
    /// `/`, `\`, `:` or `%` (`∕`). Upstreams that fold them (NFKC or case-insensitive
    /// routing, Windows' best-fit mapping of the delimiters) would serve another path than the
    /// one routed and judged.
    #[error("the path has a character that folds into ASCII")]
    FoldsToAscii,
}

/// The one canonical form of a request path that Sandgate routes and evaluates on.
///
/// Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §2.3, equivalent to
/// their decoded form) are decoded and every other escape's hex digits uppercased. Anything a
/// server behind the proxy could read differently is refused: a `;` parameter, `%25` (double
/// encoding), `%00`, a control or raw non-ASCII byte, a backslash raw or encoded, an encoded
/// reserved character (`%2F`, `%3F`, `%3B`, …), a `.` or `..` segment, an empty segment (`//`).
/// Percent-encoded non-ASCII bytes must be UTF-8, and no such character may fold into ASCII
/// ([`AmbiguousPath::FoldsToAscii`]).
/// A single trailing `/` is kept. Case is kept: routes match path prefixes case-insensitively,
/// so `/ADMIN` cannot dodge the `/admin` route, and the policy sees the path as sent.
pub fn canonical_path(path: &str) -> Result<String, AmbiguousPath> {
    const RESERVED: &[u8] = b":/?#[]@!$&'()*+,;=";
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(AmbiguousPath::NotAbsolute);
    }
    let mut out = String::with_capacity(path.len());
    let mut non_ascii = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b';' => return Err(AmbiguousPath::Parameter),
            b'\\' => return Err(AmbiguousPath::Byte),
            b if !(0x20..0x7f).contains(&b) => return Err(AmbiguousPath::Byte),
            // Not allowed raw in a path (RFC 3986 pchar): a space, `#` (a server cuts the
            // fragment off: `/admin#/x` is `/admin`), `"<>[]^`{|}`.
            b' ' | b'#' | b'"' | b'<' | b'>' | b'[' | b']' | b'^' | b'`' | b'{' | b'|' | b'}' => {
                return Err(AmbiguousPath::Byte);
            }
            b'%' => {
                let hex = |at: usize| bytes.get(at).and_then(|h| (*h as char).to_digit(16));
                let (Some(high), Some(low)) = (hex(i + 1), hex(i + 2)) else { return Err(AmbiguousPath::BadEscape) };
                let decoded = (high * 16 + low) as u8;
                if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
                    out.push(decoded as char);
                } else if decoded == b'%'
                    || decoded < 0x20
                    || decoded == 0x7f
                    || decoded == b'\\'
                    || RESERVED.contains(&decoded)
                {
                    return Err(AmbiguousPath::EncodedDelimiter);
                } else {
                    non_ascii |= decoded >= 0x80;
                    out.push('%');
                    out.push_str(&format!("{decoded:02X}"));
                }
                i += 3;
                continue;
            }
            b => out.push(b as char),
        }
        i += 1;
    }
    let inner = out.strip_prefix('/').unwrap_or(&out);
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if out.len() > 1 {
        for segment in inner.split('/') {
            match segment {
                "" => return Err(AmbiguousPath::EmptySegment),
                "." | ".." => return Err(AmbiguousPath::DotSegment),
                _ => {}
            }
        }
    }
    if non_ascii {
        non_ascii_is_plain(&out)?;
    }
    Ok(out)
}

/// The percent-encoded non-ASCII characters of a canonical path (every other escape is of an
/// ASCII byte that stays encoded) are UTF-8 and none folds into ASCII.
fn non_ascii_is_plain(canonical: &str) -> Result<(), AmbiguousPath> {
    use unicode_normalization::UnicodeNormalization;
    let bytes = canonical.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        // `canonical_path` left only `%` + two uppercase hex digits.
        let byte = if b == b'%' {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            i += 3;
            match hex {
                Some(byte) if byte >= 0x80 => byte,
                // An encoded ASCII byte is not a character of its own here.
                _ => b'%',
            }
        } else {
            i += 1;
            b
        };
        decoded.push(byte);
    }
    let text = std::str::from_utf8(&decoded).map_err(|_| AmbiguousPath::NotUtf8)?;
    // Simple case mappings, one character to one (what Java's `equalsIgnoreCase` and .NET's
    // `OrdinalIgnoreCase` compare with); U+0130 `İ`'s is `i`, though its full lowercase is
    // `i̇`. `ß` (uppercase `SS`, no simple mapping) stays allowed.
    fn single_ascii(mut mapped: impl Iterator<Item = char>) -> bool {
        matches!((mapped.next(), mapped.next()), (Some(m), None) if m.is_ascii())
    }
    let folds = |c: char| c == '\u{130}' || single_ascii(c.to_lowercase()) || single_ascii(c.to_uppercase());
    if text.chars().any(|c| !c.is_ascii() && (folds(c) || invisible_or_delimiter(c))) {
        return Err(AmbiguousPath::FoldsToAscii);
    }
    // Compatibility normalization of each run of non-ASCII characters: a run, not a
    // character, so that a base letter and its combining mark compose as NFKC composes them.
    for run in text.split(|c: char| c.is_ascii()).filter(|run| !run.is_empty()) {
        if run.nfkc().any(|c| c.is_ascii()) {
            return Err(AmbiguousPath::FoldsToAscii);
        }
    }
    Ok(())
}

/// A character that some upstream drops or reads as a path delimiter, though NFKC keeps it:
/// the default-ignorable code points (soft hyphen, zero-width and bidirectional controls,
/// variation selectors, tags: NFKC_Casefold and some file systems drop them), and the
/// look-alikes of `/`, `\`, `:` and `%` that Windows' best-fit mappings turn into them
/// (`∕` `⁄` `∖` `։` `∶` `٪`).
fn invisible_or_delimiter(c: char) -> bool {
    matches!(
        c,
        '\u{AD}'
            | '\u{34F}'
            | '\u{61C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
            | '\u{2215}'
            | '\u{2044}'
            | '\u{2216}'
            | '\u{589}'
            | '\u{2236}'
            | '\u{66A}'
    )
}

/// The bearer token of `headers` (lowercase names), as [`OriginalRequest::bearer`] reads it.
pub(crate) fn bearer_of(headers: &[Header]) -> Bearer<'_> {
    match headers.iter().find(|h| h.name == "authorization") {
        Some(h) => bearer_token(&h.value),
        None => Bearer::None,
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
            ..Default::default()
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
    fn every_known_bypass_spelling_is_refused() {
        use AmbiguousPath::*;
        let cases = [
            ("/a/../admin", DotSegment),
            ("/a/./b", DotSegment),
            ("/..", DotSegment),
            ("//admin", EmptySegment),
            ("/a//b", EmptySegment),
            ("/a\\b", Byte),
            ("/%2e%2e/admin", DotSegment),
            ("/%2E/x", DotSegment),
            ("/.%2e/admin", DotSegment),
            ("/a%2Fb", EncodedDelimiter),
            ("/a%5cb", EncodedDelimiter),
            ("/public/..;/admin", Parameter),
            ("/admin;x=1/users", Parameter),
            ("/%252e%252e/admin", EncodedDelimiter),
            ("/admin%00.json", EncodedDelimiter),
            ("/admin%3Bx", EncodedDelimiter),
            ("/a%3Fb", EncodedDelimiter),
            ("/a%", BadEscape),
            ("/a%g1", BadEscape),
            ("/caf\u{e9}", Byte),
            ("/a\tb", Byte),
            ("/admin#/x", Byte),
            ("/a b", Byte),
            ("/a{b}", Byte),
            ("admin", NotAbsolute),
            // Overlong `.` and `/`, a lone continuation byte, an encoded surrogate, Latin-1.
            ("/%C0%AE%C0%AE/admin", NotUtf8),
            ("/a%C0%AFadmin", NotUtf8),
            ("/a%80", NotUtf8),
            ("/%ED%A0%80", NotUtf8),
            ("/caf%E9", NotUtf8),
            // Fullwidth `／` and `ａ`, KELVIN SIGN (lowercase `k`), `İ` (simple lowercase `i`),
            // dotless `ı` (uppercase `I`), long `ſ` (uppercase `S`), `²` (NFKC `2`), ONE DOT
            // LEADER (NFKC `.`), the ligature `ﬁ` (NFKC `fi`).
            ("/api%EF%BC%8Fadmin", FoldsToAscii),
            ("/%EF%BD%81dmin", FoldsToAscii),
            ("/%E2%84%AAey", FoldsToAscii),
            ("/%C4%B0nternal", FoldsToAscii),
            ("/adm%C4%B1n", FoldsToAscii),
            ("/%C5%BFecret", FoldsToAscii),
            ("/v%C2%B2", FoldsToAscii),
            ("/%E2%80%A4%E2%80%A4/admin", FoldsToAscii),
            ("/%EF%AC%81les", FoldsToAscii),
            // Dropped by NFKC_Casefold (soft hyphen, zero-width space, BOM), and best-fit
            // look-alikes of `/` and `\` (DIVISION SLASH, FRACTION SLASH, SET MINUS).
            ("/ad%C2%ADmin", FoldsToAscii),
            ("/ad%E2%80%8Bmin", FoldsToAscii),
            ("/%EF%BB%BFadmin", FoldsToAscii),
            ("/static/..%E2%88%95admin", FoldsToAscii),
            ("/a%E2%81%84b", FoldsToAscii),
            ("/a%E2%88%96b", FoldsToAscii),
        ];
        for (path, why) in cases {
            assert_eq!(canonical_path(path), Err(why), "{path:?}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_the_rest_kept() {
        assert_eq!(canonical_path("/%61dmin").as_deref(), Ok("/admin"));
        assert_eq!(canonical_path("/%7Euser/a%2Db").as_deref(), Ok("/~user/a-b"));
        assert_eq!(canonical_path("/a%20b/caf%c3%a9").as_deref(), Ok("/a%20b/caf%C3%A9"));
        assert_eq!(canonical_path("/").as_deref(), Ok("/"));
        assert_eq!(canonical_path("/api/orders/").as_deref(), Ok("/api/orders/"));
        assert_eq!(canonical_path("/a.b/c..d/.e").as_deref(), Ok("/a.b/c..d/.e"));
        assert_eq!(canonical_path("/ADMIN").as_deref(), Ok("/ADMIN"));
    }

    /// Non-ASCII text that folds into nothing ASCII is a path like any other: accented letters
    /// (precomposed, or a letter and a combining mark), `ß`, CJK, Cyrillic, an encoded `%`-free
    /// ASCII escape beside them.
    #[test]
    fn plain_non_ascii_characters_are_kept() {
        for path in [
            "/caf%C3%A9",
            "/cafe%CC%81",
            "/stra%C3%9Fe",
            "/%E4%B8%AD%E6%96%87/%D0%BF%D1%83%D1%82%D1%8C",
            "/a%20%C3%A9",
            "/%CE%A9",
        ] {
            assert_eq!(canonical_path(path).as_deref(), Ok(path), "{path:?}");
        }
    }

    mod properties {
        use super::super::canonical_path;
        use proptest::prelude::*;

        /// A path segment of unreserved characters that is not a dot segment.
        fn segment() -> impl Strategy<Value = String> {
            "[A-Za-z0-9._~-]{1,8}".prop_filter("not a dot segment", |s| s != "." && s != "..")
        }

        /// `text` with the characters `mask` selects percent-encoded (lowercase hex).
        fn encode_some(text: &str, mask: u64) -> String {
            text.chars()
                .enumerate()
                .map(|(i, c)| if (mask >> (i % 64)) & 1 == 1 { format!("%{:02x}", c as u32) } else { c.to_string() })
                .collect()
        }

        proptest! {
            #[test]
            fn canonical_forms_are_fixed_points(path in "/[ -~]{0,40}") {
                if let Ok(canonical) = canonical_path(&path) {
                    prop_assert_eq!(canonical_path(&canonical), Ok(canonical.clone()));
                }
            }

            #[test]
            fn a_canonical_form_has_nothing_to_reinterpret(path in "/[ -~]{0,40}") {
                if let Ok(c) = canonical_path(&path) {
                    prop_assert!(!c.contains(';') && !c.contains("//") && !c.contains('\\'));
                    prop_assert!(!c.contains('#') && !c.contains(' '));
                    prop_assert!(!c.split('/').any(|s| s == "." || s == ".."));
                    let upper = c.to_ascii_uppercase();
                    for escape in ["%25", "%00", "%2F", "%2E", "%3B", "%5C", "%41"] {
                        prop_assert!(!upper.contains(escape), "{} in {}", escape, c);
                    }
                }
            }

            #[test]
            fn encoding_unreserved_characters_never_changes_the_canonical_form(
                segments in proptest::collection::vec(segment(), 1..5),
                mask in any::<u64>(),
            ) {
                let encoded: Vec<String> = segments.iter().map(|s| encode_some(s, mask)).collect();
                let plain = format!("/{}", segments.join("/"));
                prop_assert_eq!(canonical_path(&plain), Ok(plain.clone()));
                prop_assert_eq!(canonical_path(&format!("/{}", encoded.join("/"))), Ok(plain));
            }
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
