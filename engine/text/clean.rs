//! Wan's prompt cleaning, as WanPipeline's `prompt_clean` does it:
//!
//! ```text
//! basic_clean(t)      = html.unescape(html.unescape(ftfy.fix_text(t))).strip()
//! whitespace_clean(t) = re.sub(r"\s+", " ", t).strip()
//! prompt_clean(t)     = whitespace_clean(basic_clean(t))
//! ```
//!
//! `html.unescape` and the whitespace steps are Python's exactly (entity tables generated
//! from the standard library into tables.rs; `\s` and `strip()` use Python's `isspace`).
//!
//! `ftfy.fix_text` (6.3.1, default config) is reproduced step by step, in its order and
//! with its fixed-point loop, for everything that matters to prompts: its own HTML
//! unescaping (semicolon-terminated entities, upper-cased ones, numeric references; off
//! for the rest of the text once a line contains `<`), C1 controls read as windows-1252,
//! Latin ligatures, full/half-width forms, curly quotes, line breaks, ANSI terminal
//! escapes, control characters, and NFC. Where reel differs from ftfy:
//! - mojibake repair (`fix_encoding`: text that was UTF-8 decoded as Latin-1 or
//!   windows-1252, e.g. `doesnâ€™t`) is not attempted: such text passes through unchanged;
//! - `fix_surrogates` has nothing to do (a Rust string cannot hold surrogates);
//! - NFC uses the `unicode-normalization` crate's Unicode version, which may differ from
//!   the Python build's for characters added in the newest Unicode versions;
//! - ftfy's `max_decode_length` (lines longer than 1,000,000 characters are split) is
//!   not applied.

use unicode_normalization::UnicodeNormalization;

use super::tables;

/// Python's `str.isspace()`, which `\s` and `strip()` use: Unicode White_Space plus the
/// information separators U+001C..U+001F.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// WanPipeline's `prompt_clean`.
pub fn prompt_clean(text: &str) -> String {
    let t = fix_text(text);
    let t = html_unescape(&html_unescape(&t));
    let t = t.trim_matches(py_isspace);
    // re.sub(r"\s+", " ", t).strip()
    let mut out = String::with_capacity(t.len());
    let mut in_space = false;
    for c in t.chars() {
        if py_isspace(c) {
            in_space = true;
        } else {
            if in_space && !out.is_empty() {
                out.push(' ');
            }
            in_space = false;
            out.push(c);
        }
    }
    out
}

fn lookup(table: &'static [(&'static str, &'static str)], key: &str) -> Option<&'static str> {
    table
        .binary_search_by(|(k, _)| (*k).cmp(key))
        .ok()
        .map(|i| table[i].1)
}

fn lookup_u32<V>(table: &[(u32, V)], key: u32) -> Option<&V> {
    table
        .binary_search_by_key(&key, |(k, _)| *k)
        .ok()
        .map(|i| &table[i].1)
}

/// Python's `html.unescape`.
pub fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '&' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match charref_at(&chars, i + 1) {
            Some((end, replacement)) => {
                out.push_str(&replacement);
                i = end;
            }
            None => {
                out.push('&');
                i += 1;
            }
        }
    }
    out
}

/// Matches html's `_charref` regex after an `&` at `start` and returns (end, replacement).
fn charref_at(c: &[char], start: usize) -> Option<(usize, String)> {
    let at = |i: usize| c.get(i).copied();
    if at(start) == Some('#') {
        let (digits_from, radix) = match at(start + 1) {
            Some('x') | Some('X') if at(start + 2).is_some_and(|d| d.is_ascii_hexdigit()) => {
                (start + 2, 16)
            }
            Some(d) if d.is_ascii_digit() => (start + 1, 10),
            _ => return None,
        };
        let mut end = digits_from;
        while at(end).is_some_and(|d| d.is_digit(radix)) {
            end += 1;
        }
        let digits: String = c[digits_from..end].iter().collect();
        if at(end) == Some(';') {
            end += 1;
        }
        // Python ints are unbounded: anything that overflows u64 is > 0x10FFFF.
        let num = u64::from_str_radix(&digits, radix).unwrap_or(u64::MAX);
        return Some((end, numeric_charref(num)));
    }
    let mut end = start;
    while end < c.len()
        && end - start < 32
        && !matches!(c[end], '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';')
    {
        end += 1;
    }
    if end == start {
        return None;
    }
    if at(end) == Some(';') {
        end += 1;
    }
    let name: String = c[start..end].iter().collect();
    if let Some(v) = lookup(tables::HTML5, name.as_str()) {
        return Some((end, v.to_string()));
    }
    // The longest prefix that is an entity (those without `;`, like `&amp` or `&eacute`).
    let n = end - start;
    for x in (2..n).rev() {
        let prefix: String = c[start..start + x].iter().collect();
        if let Some(v) = lookup(tables::HTML5, prefix.as_str()) {
            let rest: String = c[start + x..end].iter().collect();
            return Some((end, format!("{v}{rest}")));
        }
    }
    Some((end, format!("&{name}")))
}

fn numeric_charref(num: u64) -> String {
    if let Ok(n) = u32::try_from(num) {
        if let Some(v) = lookup_u32(tables::INVALID_CHARREFS, n) {
            return v.to_string();
        }
    }
    if (0xD800..=0xDFFF).contains(&num) || num > 0x10FFFF {
        return "\u{FFFD}".into();
    }
    let n = num as u32;
    if tables::INVALID_CODEPOINTS.binary_search(&n).is_ok() {
        return String::new();
    }
    char::from_u32(n)
        .map(String::from)
        .unwrap_or_else(|| "\u{FFFD}".into())
}

/// `ftfy.fix_text` with its default configuration, less mojibake repair (see the module
/// docs). Lines are fixed one at a time; HTML unescaping stops for good at the first line
/// that contains `<`.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if unescape && segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let orig = text.clone();
        if unescape {
            text = ftfy_unescape(&text);
        }
        text = map_chars(&text, |c| {
            lookup_u32(tables::C1_CONTROLS, c as u32).copied()
        });
        text = map_chars(&text, |c| lookup_u32(tables::LIGATURES, c as u32).copied());
        text = map_chars(&text, |c| lookup_u32(tables::WIDTH_MAP, c as u32).copied());
        text = map_chars(&text, |c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => Some("'"),
            '\u{201c}'..='\u{201f}' => Some("\""),
            _ => None,
        });
        text = fix_line_breaks(&text);
        text = remove_terminal_escapes(&text);
        text = map_chars(&text, |c| {
            tables::CONTROL_CHARS
                .binary_search(&(c as u32))
                .is_ok()
                .then_some("")
        });
        text = text.nfc().collect();
        if text == orig {
            return text;
        }
    }
}

fn map_chars(s: &str, f: impl Fn(char) -> Option<&'static str>) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match f(c) {
            Some(r) => out.push_str(r),
            None => out.push(c),
        }
    }
    out
}

/// ftfy's unescape_html: `&#?[0-9A-Za-z]{1,24};` replaced when it is a known entity (with
/// its `;`), or a numeric reference that html.unescape decodes completely.
fn ftfy_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let b = tail.as_bytes();
        let mut end = 1;
        if b.get(1) == Some(&b'#') {
            end = 2;
        }
        let name_start = end;
        while end < b.len() && end - name_start < 24 && b[end].is_ascii_alphanumeric() {
            end += 1;
        }
        if end > name_start && b.get(end) == Some(&b';') {
            let m = &tail[..=end];
            if let Some(v) = lookup(tables::FTFY_ENTITIES, m) {
                out.push_str(v);
            } else if m.starts_with("&#") {
                let u = html_unescape(m);
                out.push_str(if u.contains(';') { m } else { &u });
            } else {
                out.push_str(m);
            }
            rest = &tail[end + 1..];
        } else {
            out.push('&');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

fn fix_line_breaks(s: &str) -> String {
    s.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

/// Removes `ESC [ (digits | ;)* letter`.
fn remove_terminal_escapes(s: &str) -> String {
    if !s.contains('\u{1b}') {
        return s.to_string();
    }
    let c: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < c.len() {
        if c[i] == '\u{1b}' && c.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < c.len() && (c[j].is_ascii_digit() || c[j] == ';') {
                j += 1;
            }
            if j < c.len() && c[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(c[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_matches_python_edge_cases() {
        // Expected values from CPython's html.unescape.
        assert_eq!(html_unescape("&amp;amp;"), "&amp;");
        assert_eq!(
            html_unescape("&ampx &eacutex &notit; &#x41; &#65 &#0; &#x110000; &#128;"),
            "&x éx ¬it; A A \u{fffd} \u{fffd} €"
        );
        assert_eq!(html_unescape("& &; &# &#x; a&b"), "& &; &# &#x; a&b");
    }

    #[test]
    fn ftfy_steps() {
        assert_eq!(
            fix_text("P&EACUTE;REZ &checkmark; &nTILDE;"),
            "PÉREZ ✓ &nTILDE;"
        );
        assert_eq!(fix_text("&amp;amp;amp;"), "&");
        assert_eq!(fix_text("<b>&amp;</b>"), "<b>&amp;</b>");
        assert_eq!(fix_text("\u{1b}[31mred\u{1b}[0m"), "red");
        assert_eq!(fix_text("a\r\nb\rc\u{85}"), "a\nb\nc…");
        assert_eq!(fix_text("\u{feff}x\u{0}"), "x");
    }
}
