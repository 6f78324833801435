//! Path patterns for routes in policies and data documents.

/// Match `path` against `pattern`, returning the captured `{name}` segments.
///
/// Patterns are `/`-separated segments: a literal matches itself, `*` matches any one non-empty
/// segment, `{name}` matches any one non-empty segment and captures it, and a final `**`
/// matches the rest of the path (zero or more segments). The query string is never part of
/// `path`.
///
/// A pattern with `**` anywhere but at its end matches nothing: `/api/**/read` is not
/// `/api/**`, and reading it so would allow far more than it says. `*` never matches the empty
/// segment of a trailing slash: `/users/*` does not match `/users/`, which many upstreams serve
/// as `/users`.
///
/// ```
/// use sandgate_policy_sdk::match_path;
/// assert_eq!(match_path("/tenants/{id}/**", "/tenants/acme/orders/7"), Some(vec![("id", "acme")]));
/// assert_eq!(match_path("/api/*", "/api/orders"), Some(vec![]));
/// assert_eq!(match_path("/api/*", "/api/orders/7"), None);
/// ```
pub fn match_path<'p, 'a>(pattern: &'p str, path: &'a str) -> Option<Vec<(&'p str, &'a str)>> {
    matches(pattern, path, false)
}

/// [`match_path`] with the pattern's literal segments compared ignoring ASCII case; captures
/// are the path's own bytes. For an upstream that serves `/Tenants/globex` as
/// `/tenants/globex`: a policy matching such paths exactly would not see `/Tenants/globex` as
/// a tenant's path at all.
///
/// ```
/// use sandgate_policy_sdk::match_path_ignore_case;
/// assert_eq!(match_path_ignore_case("/tenants/{id}/**", "/Tenants/Globex/x"), Some(vec![("id", "Globex")]));
/// ```
pub fn match_path_ignore_case<'p, 'a>(pattern: &'p str, path: &'a str) -> Option<Vec<(&'p str, &'a str)>> {
    matches(pattern, path, true)
}

fn matches<'p, 'a>(pattern: &'p str, path: &'a str, ignore_case: bool) -> Option<Vec<(&'p str, &'a str)>> {
    let mut captures = Vec::new();
    let mut segments = path.strip_prefix('/')?.split('/');
    let mut parts = pattern.strip_prefix('/')?.split('/').peekable();
    while let Some(part) = parts.next() {
        if part == "**" {
            return parts.peek().is_none().then_some(captures);
        }
        let segment = segments.next()?;
        if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if segment.is_empty() {
                return None;
            }
            captures.push((name, segment));
        } else if part == "*" {
            if segment.is_empty() {
                return None;
            }
        } else if !(part == segment || ignore_case && part.eq_ignore_ascii_case(segment)) {
            return None;
        }
    }
    segments.next().is_none().then_some(captures)
}

#[cfg(test)]
mod tests {
    use super::match_path;

    #[test]
    fn patterns() {
        assert_eq!(match_path("/", "/"), Some(vec![]));
        assert_eq!(match_path("/api/**", "/api"), Some(vec![]));
        assert_eq!(match_path("/api/**", "/api/a/b"), Some(vec![]));
        assert_eq!(match_path("/api/**", "/apiary"), None);
        assert_eq!(match_path("/a/{x}/c/{y}", "/a/1/c/2"), Some(vec![("x", "1"), ("y", "2")]));
        assert_eq!(match_path("/a/{x}", "/a/"), None);
        assert_eq!(match_path("/a/*", "/a"), None);
        assert_eq!(match_path("/a", "a"), None);
        assert_eq!(match_path("/a", "/a/"), None);
    }

    /// Patterns that would allow more than they say match nothing.
    #[test]
    fn a_double_star_not_at_the_end_and_an_empty_segment_match_nothing() {
        assert_eq!(match_path("/api/**/read", "/api/admin/export"), None);
        assert_eq!(match_path("/api/**/read", "/api/x/read"), None);
        assert_eq!(match_path("/**/x", "/x"), None);
        assert_eq!(match_path("/users/*", "/users/"), None);
        assert_eq!(match_path("/users/*/orders", "/users//orders"), None);
        assert_eq!(match_path("/users/*", "/users/7"), Some(vec![]));
        assert_eq!(match_path("/**", "/"), Some(vec![]));
    }

    #[test]
    fn ignoring_case_compares_literals_only() {
        use super::match_path_ignore_case as m;
        assert_eq!(m("/tenants/{id}/**", "/TENANTS/AcMe/x"), Some(vec![("id", "AcMe")]));
        assert_eq!(m("/api/*", "/API/x"), Some(vec![]));
        assert_eq!(m("/api/**/x", "/API/y/x"), None);
        assert_eq!(match_path("/tenants/{id}/**", "/Tenants/acme"), None);
    }
}
