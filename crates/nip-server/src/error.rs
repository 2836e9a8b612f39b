//! The one error type that HTTP handlers return, and its mapping to status codes and JSON bodies.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unprocessable(String),
    /// The request depends on an answer this server could not get (an upstream's).
    #[error("{0}")]
    FailedDependency(String),
    /// Seconds until the caller may retry.
    #[error("too many requests: retry in {0} s")]
    TooManyRequests(u64),
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Unavailable(String),
    /// Details are logged, never sent: they may hold paths or OS error text.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        // Exhaustive on purpose: a new variant must choose its status.
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::FailedDependency(_) => StatusCode::FAILED_DEPENDENCY,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<nip_store::StoreError> for ApiError {
    fn from(e: nip_store::StoreError) -> Self {
        match e {
            nip_store::StoreError::Full(_) => ApiError::InsufficientStorage(
                "the cache's storage is full: free space or lower --cache-max-size, then retry"
                    .into(),
            ),
            nip_store::StoreError::InvalidKey(k) => {
                ApiError::BadRequest(format!("invalid key {k:?}"))
            }
            nip_store::StoreError::Io(e) => ApiError::internal(format!("storage: {e}")),
        }
    }
}

impl From<nip_store::MetaError> for ApiError {
    fn from(e: nip_store::MetaError) -> Self {
        ApiError::Unavailable(format!("database: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal server error; the server log has the details".to_string()
            }
            ApiError::Unavailable(detail) => {
                tracing::warn!(%detail, "service unavailable");
                "the cache's database is unavailable; retry shortly".to_string()
            }
            other => other.to_string(),
        };
        let mut resp = (status, Json(nip_core::api::ErrorBody { error: message })).into_response();
        if let ApiError::TooManyRequests(secs) = &self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"nip\""),
            );
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// Nix 2.8 hangs when a PUT gets a 5xx (it retries without the body), so refused uploads
    /// always get a 4xx; the server log keeps the details of server-side failures.
    pub fn for_nix_upload(self) -> Self {
        match self {
            ApiError::InsufficientStorage(m) => ApiError::PayloadTooLarge(m),
            // Nix retries a 429 (and 408) like a 5xx, without the body: it would hang too.
            ApiError::TooManyRequests(secs) => ApiError::Conflict(format!(
                "too many requests or bytes in flight from this client: retry in {secs} s"
            )),
            ApiError::Internal(detail)
            | ApiError::Unavailable(detail)
            | ApiError::BadGateway(detail) => {
                tracing::error!(%detail, "Nix upload failed on the server side");
                ApiError::Conflict("the cache could not store this upload; retry later (the server log has the details)".into())
            }
            other => other,
        }
    }
}
