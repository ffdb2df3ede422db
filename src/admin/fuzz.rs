//! The admin query fuzz target's way in: every query string and body the
//! admin API parses, parsed as its handlers do. Built only with the
//! `fuzzing` feature.

use axum::extract::Query;
use axum::http::Uri;

use super::{commands, events, services};
use crate::registry;

/// Parses `query` as each endpoint's query string, and `body` as each
/// command body; returns the listing's filter, cursor and page size when
/// `query` is a valid listing.
pub fn parse(query: &str, body: &[u8], max_page: usize) -> Option<(registry::Query, u32, usize)> {
    commands::check_bodies(body);
    let uri: Uri = format!("/services?{query}").parse().ok()?;
    let _ = Query::<events::EventParams>::try_from_uri(&uri);
    let _ = Query::<commands::ToolsParams>::try_from_uri(&uri);
    let _ = Query::<services::SummaryParams>::try_from_uri(&uri);
    let Query(p) = Query::<services::ListParams>::try_from_uri(&uri).ok()?;
    let parsed = services::list_query(p, max_page).ok()?;
    assert!(
        (1..=max_page).contains(&parsed.2),
        "a page size within bounds"
    );
    Some(parsed)
}
