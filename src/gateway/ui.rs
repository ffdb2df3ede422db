//! The Admin UI's assets, built by Vite from `ui/` (npm run build) into
//! `ui/dist` and embedded here, so no Node is needed at run time. `.ci/run`
//! builds them again and fails when the committed ones differ from what
//! the sources give.
//!
//! The file names are fixed (the build does not hash them), so they are
//! served with an ETag and `Cache-Control: no-cache`: a browser revalidates
//! and gets a 304 until the binary changes.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

struct Asset {
    body: &'static [u8],
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_bytes!("../../ui/dist/index.html"),
    content_type: "text/html; charset=utf-8",
};
const APP_JS: Asset = Asset {
    body: include_bytes!("../../ui/dist/assets/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const APP_CSS: Asset = Asset {
    body: include_bytes!("../../ui/dist/assets/app.css"),
    content_type: "text/css; charset=utf-8",
};

/// The asset a GET path names: the files, and the UI's own routes (which
/// all load the page).
fn asset(path: &str) -> Option<&'static Asset> {
    match path {
        "/assets/app.js" => Some(&APP_JS),
        "/assets/app.css" => Some(&APP_CSS),
        "/" | "/instances" | "/events" => Some(&INDEX),
        p if p.strip_prefix("/instances/").is_some_and(|id| {
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        }) =>
        {
            Some(&INDEX)
        }
        _ => None,
    }
}

/// One tag for all assets: they change together, with the binary.
fn etag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        // FNV-1a over every asset.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for a in [&INDEX, &APP_JS, &APP_CSS] {
            for &b in a.body {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("\"{h:016x}\"")
    })
}

/// The UI's answer to a GET of `path`, if it is the UI's.
pub fn serve(path: &str, headers: &HeaderMap) -> Option<Response> {
    let asset = asset(path)?;
    let tag = etag();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ui_routes_load_the_page_and_nothing_else_does() {
        let page = |p| asset(p).map(|a| a.content_type);
        assert_eq!(page("/"), Some(INDEX.content_type));
        assert_eq!(
            page("/instances/0190b5a4-1111-7000-8000-000000000001"),
            Some(INDEX.content_type)
        );
        assert_eq!(page("/assets/app.js"), Some(APP_JS.content_type));
        for p in [
            "/instances/../x",
            "/instances/",
            "/assets/other.js",
            "/favicon.ico",
            "/api/x",
        ] {
            assert!(asset(p).is_none(), "{p}");
        }
        assert!(
            INDEX.body.starts_with(b"<!doctype html>"),
            "the built page is embedded"
        );
        let headers = HeaderMap::new();
        let r = serve("/", &headers).unwrap();
        let tag = r.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, tag);
        assert_eq!(
            serve("/", &again).unwrap().status(),
            StatusCode::NOT_MODIFIED
        );
    }
}
