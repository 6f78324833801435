//! Path patterns for routes in policies and data documents.

/// Match `path` against `pattern`, returning the captured `{name}` segments.
///
/// Patterns are `/`-separated segments: a literal matches itself, `*` matches any one segment,
/// `{name}` matches any one segment and captures it, and a final `**` matches the rest of the
/// path (zero or more segments). The query string is never part of `path`.
///
/// ```
/// use sandgate_policy_sdk::match_path;
/// assert_eq!(match_path("/tenants/{id}/**", "/tenants/acme/orders/7"), Some(vec![("id", "acme")]));
/// assert_eq!(match_path("/api/*", "/api/orders"), Some(vec![]));
/// assert_eq!(match_path("/api/*", "/api/orders/7"), None);
/// ```
pub fn match_path<'p, 'a>(pattern: &'p str, path: &'a str) -> Option<Vec<(&'p str, &'a str)>> {
    let mut captures = Vec::new();
    let mut segments = path.strip_prefix('/')?.split('/');
    for part in pattern.strip_prefix('/')?.split('/') {
        if part == "**" {
            return Some(captures);
        }
        let segment = segments.next()?;
        if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if segment.is_empty() {
                return None;
            }
            captures.push((name, segment));
        } else if part != "*" && part != segment {
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
}
