//! Literal normalization for the decision cache: replaces string and numeric literals with `?`
//! so that statements differing only in literal values share one cached decision — but only when
//! the control plane marked that decision as independent of literal values.
//!
//! Soundness rests on tokenizing exactly like PostgreSQL's lexer for the constructs that change
//! token boundaries (quotes, dollar quotes, comments). Anything we are not sure about returns None
//! and the statement is cached by its exact text only. `standard_conforming_strings` is pinned on
//! for upstream sessions, so a backslash inside '...' is an ordinary character.

/// Returns the normalized text, or None if the text uses a construct we do not tokenize with
/// certainty (unterminated quote or comment, non-UTF-8, backslash-escape strings with odd forms).
pub fn normalize(sql: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(sql).ok()?;
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let n = b.len();
    while i < n {
        let c = b[i];
        match c {
            b'\'' => {
                i = skip_quoted(b, i + 1, false)?;
                out.push('?');
            }
            b'"' => {
                // Quoted identifier: kept verbatim (it names things the decision depends on).
                let start = i;
                i += 1;
                i = quoted_ident_end(b, i)?;
                out.push_str(&s[start..i]);
            }
            b'-' if i + 1 < n && b[i + 1] == b'-' => {
                i = line_comment_end(b, i);
                out.push(' ');
            }
            b'/' if i + 1 < n && b[i + 1] == b'*' => {
                i = block_comment_end(b, i)?;
                out.push(' ');
            }
            b'$' => {
                // $1 parameter, $tag$...$tag$ dollar quote, or part of an identifier (handled below).
                if i + 1 < n && b[i + 1].is_ascii_digit() {
                    let start = i;
                    i += 1;
                    while i < n && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    out.push_str(&s[start..i]);
                } else {
                    let tag_end = dollar_tag_end(b, i)?;
                    let tag = &b[i..tag_end];
                    let body_start = tag_end;
                    let close = find(b, body_start, tag)?;
                    i = close + tag.len();
                    out.push('?');
                }
            }
            b'0'..=b'9' => {
                i = skip_number(b, i)?;
                out.push('?');
            }
            b'.' if i + 1 < n && b[i + 1].is_ascii_digit() => {
                i = skip_number(b, i)?;
                out.push('?');
            }
            _ if is_ident_start(c) => {
                let start = i;
                while i < n && is_ident_cont(b[i]) {
                    i += 1;
                }
                let word = &s[start..i];
                // Prefixed string literals: E'..', B'..', X'..', N'..', U&'..'.
                if i < n && b[i] == b'\'' && word.len() == 1 && matches!(c | 0x20, b'e' | b'b' | b'x' | b'n') {
                    let escapes = c | 0x20 == b'e';
                    i = skip_quoted(b, i + 1, escapes)?;
                    out.push('?');
                } else if word.len() == 1 && (c | 0x20) == b'u' && i + 1 < n && b[i] == b'&' && (b[i + 1] == b'\'' || b[i + 1] == b'"') {
                    // U&'...' and U&"..." can carry UESCAPE clauses; keep them exact-only.
                    return None;
                } else {
                    out.push_str(word);
                }
            }
            _ => {
                if c >= 0x80 {
                    // Non-ASCII letters start identifiers in PostgreSQL.
                    let start = i;
                    while i < n && is_ident_cont(b[i]) {
                        i += 1;
                    }
                    out.push_str(&s[start..i]);
                } else {
                    out.push(c as char);
                    i += 1;
                }
            }
        }
    }
    Some(out)
}

/// Calls `f` with the value of each literal of `sql`, in order: a quoted string's text between
/// its quotes with `''` read as one quote (E'...' strings keep their backslash escapes as
/// written), a dollar-quoted string's body, a number as written (a sign is an operator, not part
/// of it). False when the text uses a construct `normalize` does not tokenize with certainty;
/// `f` may have been called for some literals then.
pub fn for_each_literal(sql: &[u8], mut f: impl FnMut(&[u8])) -> bool {
    let b = sql;
    let n = b.len();
    let mut i = 0;
    let mut scratch: Vec<u8> = Vec::new();
    let mut string = |b: &[u8], start: usize, end: usize, f: &mut dyn FnMut(&[u8])| {
        // `start..end` is the body between the quotes.
        let body = &b[start..end];
        if memchr::memmem::find(body, b"''").is_none() {
            f(body);
        } else {
            scratch.clear();
            let mut k = 0;
            while k < body.len() {
                scratch.push(body[k]);
                k += if body[k] == b'\'' && body.get(k + 1) == Some(&b'\'') { 2 } else { 1 };
            }
            f(&scratch);
        }
    };
    while i < n {
        let c = b[i];
        match c {
            b'\'' => {
                let Some(end) = skip_quoted(b, i + 1, false) else { return false };
                string(b, i + 1, end - 1, &mut f);
                i = end;
            }
            b'"' => {
                i += 1;
                let Some(end) = quoted_ident_end(b, i) else { return false };
                i = end;
            }
            b'-' if i + 1 < n && b[i + 1] == b'-' => i = line_comment_end(b, i),
            b'/' if i + 1 < n && b[i + 1] == b'*' => {
                let Some(end) = block_comment_end(b, i) else { return false };
                i = end;
            }
            b'$' => {
                if i + 1 < n && b[i + 1].is_ascii_digit() {
                    i += 1;
                    while i < n && b[i].is_ascii_digit() {
                        i += 1;
                    }
                } else {
                    let Some(tag_end) = dollar_tag_end(b, i) else { return false };
                    let tag = &b[i..tag_end];
                    let Some(close) = find(b, tag_end, tag) else { return false };
                    f(&b[tag_end..close]);
                    i = close + tag.len();
                }
            }
            b'0'..=b'9' => {
                let Some(end) = skip_number(b, i) else { return false };
                f(&b[i..end]);
                i = end;
            }
            b'.' if i + 1 < n && b[i + 1].is_ascii_digit() => {
                let Some(end) = skip_number(b, i) else { return false };
                f(&b[i..end]);
                i = end;
            }
            _ if is_ident_start(c) => {
                let start = i;
                while i < n && is_ident_cont(b[i]) {
                    i += 1;
                }
                let one = i - start == 1;
                if i < n && b[i] == b'\'' && one && matches!(c | 0x20, b'e' | b'b' | b'x' | b'n') {
                    let Some(end) = skip_quoted(b, i + 1, c | 0x20 == b'e') else { return false };
                    string(b, i + 1, end - 1, &mut f);
                    i = end;
                } else if one && (c | 0x20) == b'u' && i + 1 < n && b[i] == b'&' && (b[i + 1] == b'\'' || b[i + 1] == b'"') {
                    return false;
                }
            }
            _ => i += 1,
        }
    }
    true
}

/// Calls `f` with each bare word of `sql` (keywords and unquoted names, as written) outside
/// strings, quoted identifiers, dollar quotes and comments, until `f` returns false. False when
/// the text cannot be lexed (an unclosed quote or comment): callers then assume the worst.
pub fn bare_words(sql: &[u8], mut f: impl FnMut(&[u8]) -> bool) -> bool {
    let (b, n) = (sql, sql.len());
    let mut i = 0;
    while i < n {
        let c = b[i];
        i = match c {
            // E'...' and friends: a backslash may escape the quote.
            b'\'' => {
                let escapes = i > 0 && (b[i - 1] | 0x20) == b'e';
                match skip_quoted(b, i + 1, escapes) {
                    Some(end) => end,
                    None => return false,
                }
            }
            b'"' => match quoted_ident_end(b, i + 1) {
                Some(end) => end,
                None => return false,
            },
            b'-' if b.get(i + 1) == Some(&b'-') => line_comment_end(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => match block_comment_end(b, i) {
                Some(end) => end,
                None => return false,
            },
            b'$' => match dollar_tag_end(b, i) {
                Some(tag_end) => match find(b, tag_end, &b[i..tag_end]) {
                    Some(close) => close + (tag_end - i),
                    None => return false,
                },
                None => i + 1,
            },
            _ if is_ident_start(c) => {
                let start = i;
                let mut end = i + 1;
                while end < n && is_ident_cont(b[end]) {
                    end += 1;
                }
                // A string prefix (E'', B'', X'', U&''): the quote is lexed next.
                if !f(&b[start..end]) {
                    return true;
                }
                end
            }
            _ => i + 1,
        };
    }
    true
}

/// The index after a quoted identifier whose body starts at `i` (after the opening `"`;
/// `""` inside is a quote); None when it is not closed.
fn quoted_ident_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        if i >= b.len() {
            return None;
        }
        if b[i] == b'"' {
            if b.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
}

/// The index of the line end after a `--` comment starting at `i` (or the text's end).
fn line_comment_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
        i += 1;
    }
    i
}

/// The index after a block comment starting at `i` (`/*`); they nest, as PostgreSQL allows.
/// None when it is not closed.
fn block_comment_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 1;
    i += 2;
    while depth > 0 {
        if i + 1 >= b.len() {
            return None;
        }
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    Some(i)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Skips a '...' body starting after the opening quote; returns the index after the closing quote.
/// PostgreSQL joins 'a' 'b' separated by whitespace containing a newline into one literal; either
/// way the result is literals only, so each becomes its own `?`.
fn skip_quoted(b: &[u8], mut i: usize, backslash_escapes: bool) -> Option<usize> {
    let n = b.len();
    loop {
        if i >= n {
            return None;
        }
        match b[i] {
            b'\\' if backslash_escapes => i += 2,
            b'\'' => {
                if i + 1 < n && b[i + 1] == b'\'' {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
}

/// If `b[i..]` starts a dollar-quote tag ($$ or $ident$), returns the index after it.
fn dollar_tag_end(b: &[u8], i: usize) -> Option<usize> {
    let n = b.len();
    let mut j = i + 1;
    if j < n && b[j] == b'$' {
        return Some(j + 1);
    }
    if j >= n || !(b[j].is_ascii_alphabetic() || b[j] == b'_' || b[j] >= 0x80) {
        return None;
    }
    while j < n && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    (j < n && b[j] == b'$').then_some(j + 1)
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// Skips a numeric literal: digits with optional `_` separators, fraction, exponent, or a
/// 0x/0o/0b prefixed integer. A letter glued to a number (`1from`) is lexed differently by
/// PostgreSQL versions (older ones split it into two tokens), so such text is not normalized.
fn skip_number(b: &[u8], mut i: usize) -> Option<usize> {
    let n = b.len();
    let digit_or_sep = |c: u8| c.is_ascii_digit() || c == b'_';
    if b[i] == b'0' && i + 1 < n && matches!(b[i + 1] | 0x20, b'x' | b'o' | b'b') {
        i += 2;
        while i < n && (b[i].is_ascii_hexdigit() || b[i] == b'_') {
            i += 1;
        }
    } else {
        while i < n && digit_or_sep(b[i]) {
            i += 1;
        }
        if i < n && b[i] == b'.' && !(i + 1 < n && b[i + 1] == b'.') {
            i += 1;
            while i < n && digit_or_sep(b[i]) {
                i += 1;
            }
        }
        if i < n && (b[i] | 0x20) == b'e' {
            let mut j = i + 1;
            if j < n && (b[j] == b'+' || b[j] == b'-') {
                j += 1;
            }
            if j < n && b[j].is_ascii_digit() {
                i = j;
                while i < n && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
        }
    }
    if i < n && is_ident_cont(b[i]) {
        return None;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    fn norm(s: &str) -> Option<String> {
        normalize(s.as_bytes())
    }

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(norm("SELECT abalance FROM pgbench_accounts WHERE aid = 4711;").unwrap(),
                   "SELECT abalance FROM pgbench_accounts WHERE aid = ?;");
        assert_eq!(norm("select 'a''b', E'x\\'y', 1.5e-3, $$z$$, $q$ $$ $q$").unwrap(), "select ?, ?, ?, ?, ?");
    }

    #[test]
    fn identifiers_and_params_are_kept() {
        assert_eq!(norm("select \"Pa\"\"t\", t1.c2, $1 from x$y").unwrap(), "select \"Pa\"\"t\", t1.c2, $1 from x$y");
    }

    #[test]
    fn comments_cannot_hide_keywords() {
        assert_eq!(norm("select 1 -- ; drop table x\n").unwrap(), "select ?  \n");
        assert_eq!(norm("select /* a /* b */ c */ 2").unwrap(), "select   ?");
    }

    #[test]
    fn different_structure_never_collides() {
        assert_ne!(norm("select * from a where x = '1'"), norm("select * from b where x = '1'"));
        assert_ne!(norm("select 'a' from t"), norm("select \"a\" from t"));
    }

    #[test]
    fn glued_number_and_word_is_exact_only() {
        assert_eq!(norm("select 1from secret"), None);
        assert_eq!(norm("select 5 secret").unwrap(), "select ? secret");
        assert_eq!(norm("select 0x1F, 1_000, .5, 1e10, 2.").unwrap(), "select ?, ?, ?, ?, ?");
    }

    #[test]
    fn unsure_constructs_are_exact_only() {
        assert_eq!(norm("select 'unterminated"), None);
        assert_eq!(norm("select /* open"), None);
        assert_eq!(norm("select U&'\\0041'"), None);
        assert_eq!(norm("select $a$ open"), None);
    }
}
