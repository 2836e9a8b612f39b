//! URLs made safe to print and log: credentials in the user-info part (`user:password@`, or a
//! token as the user name) and query strings (signed or tokenised URLs) never leave the process.

/// The URL with any `user:password@` (or `token@`) replaced by `***@`, and the value of a
/// `password=` query parameter (as PostgreSQL URLs may carry) by `***`.
pub fn redact_userinfo(url: &str) -> String {
    let masked = mask_userinfo(url);
    match masked.split_once('?') {
        Some((base, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => masked,
    }
}

fn mask_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => rest.to_string(),
    };
    match scheme {
        Some(s) => format!("{s}://{rest}"),
        None => rest,
    }
}

/// For logs: user info masked and the query string, if any, replaced by `?…`.
pub fn url_for_log(url: &str) -> String {
    let masked = redact_userinfo(url);
    match masked.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => masked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_queries_are_masked() {
        assert_eq!(
            redact_userinfo("postgres://nip:s3cr%40t@db:5432/nip?sslmode=require"),
            "postgres://***@db:5432/nip?sslmode=require"
        );
        assert_eq!(
            redact_userinfo("https://u:p@h:1/x@y"),
            "https://***@h:1/x@y"
        );
        assert_eq!(redact_userinfo("https://token@h/"), "https://***@h/");
        assert_eq!(redact_userinfo("http://h:4317"), "http://h:4317");
        assert_eq!(
            redact_userinfo("postgres://db/nip?user=nip&password=hunter2&sslmode=require"),
            "postgres://db/nip?user=nip&password=***&sslmode=require"
        );
        assert_eq!(
            redact_userinfo("sqlite:/var/lib/nip/db.sqlite"),
            "sqlite:/var/lib/nip/db.sqlite"
        );
        assert_eq!(
            url_for_log("https://u:p@cache.example/nar/x.nar.xz?token=abc"),
            "https://***@cache.example/nar/x.nar.xz?…"
        );
        assert_eq!(url_for_log("http://h/nar/x.nar"), "http://h/nar/x.nar");
    }
}
