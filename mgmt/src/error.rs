//! The REST API's errors: every failure is a status code and a JSON body
//! `{"error": "..."}`, including the ones axum produces itself (bad path parameters,
//! oversized bodies, wrong methods), which [`json_errors`] rewrites.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dataplane::handle::CommandError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong and, where it helps, what to do about it.
    pub error: String,
}

/// An operating error of the REST API, mapped to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The dataplane would not make the change (e.g. a failed disk cannot go online).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Dataplane(CommandError),
    /// The request body is over its limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The node failed at something it should manage (e.g. writing the ESP).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Auth(AuthError::Disabled) => StatusCode::FORBIDDEN,
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Dataplane(CommandError::NoSuchDisk(_)) => StatusCode::NOT_FOUND,
            ApiError::Dataplane(CommandError::Refused(_)) => StatusCode::CONFLICT,
            // Busy, timed out or stopped: the request was fine, the node cannot serve
            // it now; the client may retry.
            ApiError::Dataplane(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        ApiError::Dataplane(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: say which scheme is expected.
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Longest body of a non-JSON error response that is carried into the JSON message.
const FOREIGN_ERROR_MAX: usize = 1024;

/// Rewrites any 4xx/5xx response that is not JSON yet (axum's own rejections: a path
/// parameter that does not decode, a body over the limit, a wrong method with its empty
/// body) into `{"error": "..."}`, keeping its status and headers.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, FOREIGN_ERROR_MAX).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let error = if text.is_empty() {
        let reason = status.canonical_reason().unwrap_or("error");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            // axum adds the Allow header after this layer, so name it rather than quote it.
            format!("{reason}: the Allow header lists this resource's methods (see /openapi.json)")
        } else {
            reason.to_string()
        }
    } else {
        text
    };
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_else(|_| b"{}".to_vec());
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}
