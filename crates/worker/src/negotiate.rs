//! Content negotiation: which result format a request gets.

use ferrocorn_query_core::Format;

use crate::problem::ApiError;

/// Pick the format: `format` if given, else the best match of `Accept` (q-values honoured).
pub fn negotiate(format: Option<&str>, accept: Option<&str>) -> Result<Format, ApiError> {
    if let Some(name) = format {
        return Format::from_name(name).ok_or_else(|| ApiError::UnsupportedFormat(name.to_owned()));
    }
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Format::Json);
    };
    let mut best: Option<(Format, f32, usize)> = None;
    for (rank, format) in Format::ALL.into_iter().enumerate() {
        let mut q_for_format: Option<(f32, u8)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0)
                .clamp(0.0, 1.0);
            // Specificity: an exact type beats type/*, which beats */*.
            let specificity = if format.accepted_media_types().contains(&media.as_str()) {
                3
            } else if media.ends_with("/*")
                && format
                    .accepted_media_types()
                    .iter()
                    .any(|t| t.starts_with(&media[..media.len() - 1]))
            {
                2
            } else if media == "*/*" {
                1
            } else {
                continue;
            };
            if q_for_format.is_none_or(|(_, s)| specificity > s) {
                q_for_format = Some((q, specificity));
            }
        }
        if let Some((q, _)) = q_for_format
            && q > 0.0
            && best.is_none_or(|(_, bq, brank)| q > bq || (q == bq && rank < brank))
        {
            best = Some((format, q, rank));
        }
    }
    best.map(|(f, _, _)| f).ok_or(ApiError::NotAcceptable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_honours_format_then_accept_with_q_values() {
        assert_eq!(negotiate(None, None).ok(), Some(Format::Json));
        assert_eq!(
            negotiate(Some("csv"), Some("application/json")).ok(),
            Some(Format::Csv)
        );
        assert!(negotiate(Some("xml"), None).is_err());
        assert_eq!(negotiate(None, Some("text/csv")).ok(), Some(Format::Csv));
        assert_eq!(
            negotiate(
                None,
                Some("application/json;q=0.5, application/vnd.apache.arrow.stream")
            )
            .ok(),
            Some(Format::Arrow)
        );
        assert_eq!(negotiate(None, Some("*/*")).ok(), Some(Format::Json));
        assert_eq!(
            negotiate(None, Some("text/*;q=0.9, application/json;q=0.1")).ok(),
            Some(Format::Csv)
        );
        assert!(matches!(
            negotiate(None, Some("image/png")),
            Err(ApiError::NotAcceptable)
        ));
        assert!(matches!(
            negotiate(None, Some("application/json;q=0")),
            Err(ApiError::NotAcceptable)
        ));
    }
}
