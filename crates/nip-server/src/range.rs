//! `Range: bytes=…` header parsing (single ranges; anything else is served whole, as RFC 9110
//! allows), and the 200 / 206 / 416 answer to it ([`answer`]) for stored NARs and Nix files.
use axum::http::response::Builder;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nip_store::BlobRange;

use crate::error::{ApiError, ApiResult};

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

/// How to answer a GET or HEAD of `size` stored bytes, given its Range header.
pub enum RangeAnswer {
    /// 416 with `Content-Range: bytes */<size>`: send it as it is.
    Unsatisfiable(Response),
    /// 200, or 206 for `range`: `builder` has the status, Content-Length and Content-Range.
    Send {
        range: Option<BlobRange>,
        builder: Builder,
    },
}

/// Answers the Range header in `headers` for a body of `size` bytes. `builder` makes the
/// response for a status and a Content-Length (with headers of its own); Content-Range is added
/// to it for a partial answer.
pub fn answer(
    headers: &HeaderMap,
    size: u64,
    builder: impl FnOnce(StatusCode, u64) -> Builder,
) -> ApiResult<RangeAnswer> {
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, range) = match parse_range(range_header, size) {
        RangeRequest::Full => (StatusCode::OK, None),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, Some(r)),
        RangeRequest::Unsatisfiable => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).map_err(ApiError::internal)?,
            );
            return Ok(RangeAnswer::Unsatisfiable(resp));
        }
    };
    let len = range.map_or(size, |r| r.end - r.start + 1);
    let mut b = builder(status, len);
    if let Some(r) = range {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", r.start, r.end),
        );
    }
    Ok(RangeAnswer::Send { range, builder: b })
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

    #[test]
    fn answers() {
        let ranged = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(header::RANGE, v.parse().unwrap());
            }
            let plain = |status, len| {
                axum::http::Response::builder()
                    .status(status)
                    .header(header::CONTENT_LENGTH, len)
            };
            let resp = match answer(&h, 10, plain).unwrap() {
                RangeAnswer::Unsatisfiable(resp) => resp,
                RangeAnswer::Send { builder, .. } => {
                    builder.body(axum::body::Body::empty()).unwrap()
                }
            };
            let get = |name| {
                resp.headers()
                    .get(name)
                    .map(|v: &HeaderValue| v.to_str().unwrap().to_string())
            };
            (
                resp.status().as_u16(),
                get(header::CONTENT_LENGTH),
                get(header::CONTENT_RANGE),
            )
        };
        assert_eq!(ranged(None), (200, Some("10".into()), None));
        assert_eq!(
            ranged(Some("bytes=2-4")),
            (206, Some("3".into()), Some("bytes 2-4/10".into()))
        );
        assert_eq!(
            ranged(Some("bytes=10-")),
            (416, None, Some("bytes */10".into()))
        );
    }
}
