//! `Range: bytes=…` header parsing (single ranges; anything else is served whole, as RFC 9110
//! allows).
use nip_store::BlobRange;

#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: serve the whole body with 200.
    Full,
    Partial(BlobRange),
    /// Syntactically fine but outside the body: 416.
    Unsatisfiable,
}

pub fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let (start, end) = (start.trim(), end.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    let range = if start.is_empty() {
        // Suffix range: the last N bytes.
        match parse(end) {
            Some(0) => return RangeRequest::Unsatisfiable,
            Some(n) if size > 0 => BlobRange {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            Some(_) => return RangeRequest::Unsatisfiable,
            None => return RangeRequest::Full,
        }
    } else {
        let Some(s) = parse(start) else {
            return RangeRequest::Full;
        };
        let e = if end.is_empty() {
            size.saturating_sub(1)
        } else {
            match parse(end) {
                Some(e) if e >= s => e.min(size.saturating_sub(1)),
                _ => return RangeRequest::Full,
            }
        };
        if s >= size {
            return RangeRequest::Unsatisfiable;
        }
        BlobRange { start: s, end: e }
    };
    RangeRequest::Partial(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: u64, e: u64) -> RangeRequest {
        RangeRequest::Partial(BlobRange { start: s, end: e })
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), p(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), p(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), p(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), p(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), p(8, 9));
        assert_eq!(
            parse_range(Some("bytes=10-"), 10),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(
            parse_range(Some("bytes=0-0"), 0),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=4-2"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), RangeRequest::Full);
    }
}
