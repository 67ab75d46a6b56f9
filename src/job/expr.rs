//! The expression language of `filter` and `project`: syntax tree, lexer,
//! recursive-descent parser and a Display that parses back to the same tree.
//!
//! Precedence, loosest first: `or`, `and`, `not`, comparisons
//! (`= == != <> < <= > >=`), `+ -`, `* / %`, unary `-`. Binary operators are
//! left-associative. Keywords (`and or not true false null as`) are
//! case-insensitive and cannot be column names. Type checking and evaluation
//! live in `eval.rs`.

use std::fmt;

use arrow_schema::{ArrowError, DataType};

/// Deeper nesting than this is rejected, so that recursion stays bounded.
const NESTING_DEPTH_MAX: usize = 64;

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum ScalarValue {
    Int64(i64),
    Float64(f64),
    Utf8(String),
    Boolean(bool),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Or,
    And,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

impl BinOp {
    /// Binding strength; higher binds tighter.
    fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Eq | BinOp::NotEq | BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq => 4,
            BinOp::Add | BinOp::Sub => 5,
            BinOp::Mul | BinOp::Div | BinOp::Mod => 6,
        }
    }

    pub fn is_comparison(self) -> bool {
        self.precedence() == 4
    }

    pub fn is_logical(self) -> bool {
        matches!(self, BinOp::And | BinOp::Or)
    }

    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "or",
            BinOp::And => "and",
            BinOp::Eq => "=",
            BinOp::NotEq => "!=",
            BinOp::Lt => "<",
            BinOp::LtEq => "<=",
            BinOp::Gt => ">",
            BinOp::GtEq => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Mod => "%",
        }
    }
}

impl fmt::Display for BinOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Column(String),
    Literal(ScalarValue),
    Binary {
        op: BinOp,
        left: Box<Expr>,
        right: Box<Expr>,
    },
    Not(Box<Expr>),
    Neg(Box<Expr>),
}

#[derive(Debug, thiserror::Error)]
pub enum ExprError {
    #[error("syntax error at column {column}: expected {expected}, found {found}")]
    Syntax {
        /// 1-based character offset within the expression text.
        column: usize,
        expected: &'static str,
        found: String,
    },
    #[error("column '{column}' not found; input columns are {}", .available.join(", "))]
    UnknownColumn {
        column: String,
        available: Vec<String>,
    },
    #[error("{}", binary_type_message(*.op, .left, .right))]
    BinaryTypes {
        op: BinOp,
        left: DataType,
        right: DataType,
    },
    #[error("'{op}' needs a {expected} operand, found {found}")]
    UnaryType {
        op: &'static str,
        expected: &'static str,
        found: DataType,
    },
    #[error("division by zero in {expr}")]
    DivideByZero { expr: String },
    #[error("integer overflow in {expr}")]
    Overflow { expr: String },
    #[error("cannot evaluate {expr}: {source}")]
    Arrow { expr: String, source: ArrowError },
}

fn binary_type_message(op: BinOp, left: &DataType, right: &DataType) -> String {
    if op.is_comparison() {
        format!("'{op}' compares {left} with {right}")
    } else if op.is_logical() {
        format!("'{op}' needs Boolean operands, found {left} and {right}")
    } else {
        format!("'{op}' needs numeric operands, found {left} and {right}")
    }
}

impl Expr {
    /// Parses an expression; see the module doc for the grammar.
    pub fn parse(text: &str) -> Result<Expr, ExprError> {
        let mut parser = Parser::new(text)?;
        let expr = parser.expr()?;
        parser.expect_end()?;
        Ok(expr)
    }

    /// Parses `expr [as name]`, the form of a `project` column.
    pub fn parse_named(text: &str) -> Result<(Expr, Option<String>), ExprError> {
        let mut parser = Parser::new(text)?;
        let expr = parser.expr()?;
        let alias = parser.alias()?;
        parser.expect_end()?;
        Ok((expr, alias))
    }

    /// Binding strength of the root, for minimal parentheses in Display.
    fn precedence(&self) -> u8 {
        match self {
            Expr::Binary { op, .. } => op.precedence(),
            Expr::Not(_) => 3,
            Expr::Neg(_) => 7,
            Expr::Column(_) | Expr::Literal(_) => 8,
        }
    }

    /// Every column the expression reads, in order of appearance.
    pub fn columns(&self) -> Vec<&str> {
        let mut columns = Vec::new();
        self.visit_columns(&mut columns);
        columns
    }

    fn visit_columns<'a>(&'a self, columns: &mut Vec<&'a str>) {
        match self {
            Expr::Column(name) => columns.push(name),
            Expr::Literal(_) => {}
            Expr::Binary { left, right, .. } => {
                left.visit_columns(columns);
                right.visit_columns(columns);
            }
            Expr::Not(inner) | Expr::Neg(inner) => inner.visit_columns(columns),
        }
    }
}

/// A call like `sum(value) as total`, as written in `aggs`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct AggCall {
    pub func: String,
    /// `None` for `*`.
    pub column: Option<String>,
    pub alias: Option<String>,
}

/// Parses `func(column | *) [as name]`; the function name is not checked here.
pub(super) fn parse_agg_call(text: &str) -> Result<AggCall, ExprError> {
    let mut parser = Parser::new(text)?;
    let func = parser.identifier("an aggregate function name")?;
    parser.expect(&Token::LParen, "'('")?;
    let column = if parser.eat(&Token::Op(BinOp::Mul)) {
        None
    } else {
        Some(parser.identifier("a column name or '*'")?)
    };
    parser.expect(&Token::RParen, "')'")?;
    let alias = parser.alias()?;
    parser.expect_end()?;
    Ok(AggCall {
        func,
        column,
        alias,
    })
}

impl fmt::Display for ScalarValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScalarValue::Int64(v) => write!(f, "{v}"),
            // Debug prints the shortest text that reads back to the same f64.
            ScalarValue::Float64(v) => write!(f, "{v:?}"),
            ScalarValue::Utf8(s) => write!(f, "'{}'", s.replace('\'', "''")),
            ScalarValue::Boolean(b) => write!(f, "{b}"),
            ScalarValue::Null => f.write_str("null"),
        }
    }
}

impl fmt::Display for Expr {
    /// Prints with the fewest parentheses that parse back to the same tree.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Column(name) => f.write_str(name),
            Expr::Literal(value) => write!(f, "{value}"),
            Expr::Binary { op, left, right } => {
                let p = op.precedence();
                write_operand(f, left, left.precedence() < p)?;
                write!(f, " {op} ")?;
                write_operand(f, right, right.precedence() <= p)
            }
            Expr::Not(inner) => {
                f.write_str("not ")?;
                write_operand(f, inner, inner.precedence() < 3)
            }
            Expr::Neg(inner) => {
                f.write_str("-")?;
                // `- -x` rather than `--x` keeps the text readable.
                if matches!(**inner, Expr::Neg(_)) {
                    f.write_str(" ")?;
                }
                write_operand(f, inner, inner.precedence() < 7)
            }
        }
    }
}

fn write_operand(f: &mut fmt::Formatter<'_>, expr: &Expr, parenthesize: bool) -> fmt::Result {
    if parenthesize {
        write!(f, "({expr})")
    } else {
        write!(f, "{expr}")
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Literal(ScalarValue),
    Op(BinOp),
    Not,
    As,
    LParen,
    RParen,
}

/// A token with its 1-based character column and its text, for messages.
struct Lexeme {
    token: Token,
    column: usize,
    text: String,
}

fn syntax(column: usize, expected: &'static str, found: impl Into<String>) -> ExprError {
    ExprError::Syntax {
        column,
        expected,
        found: found.into(),
    }
}

/// Splits `text` into lexemes.
fn lex(text: &str) -> Result<Vec<Lexeme>, ExprError> {
    let chars: Vec<char> = text.chars().collect();
    let mut lexemes = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = i;
        let token = match chars[i] {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            'A'..='Z' | 'a'..='z' | '_' => {
                i = scan(&chars, i, |c| c.is_ascii_alphanumeric() || c == '_');
                word(chars[start..i].iter().collect())
            }
            '0'..='9' => {
                let (value, end) = lex_number(&chars, i)?;
                i = end;
                Token::Literal(value)
            }
            '\'' | '"' => {
                let (value, end) = lex_string(&chars, i)?;
                i = end;
                Token::Literal(ScalarValue::Utf8(value))
            }
            c => {
                let expected = "an operator, name or literal";
                let (token, width) = symbol(c, chars.get(i + 1).copied())
                    .ok_or_else(|| syntax(i + 1, expected, format!("'{c}'")))?;
                i += width;
                token
            }
        };
        let text = chars[start..i].iter().collect();
        lexemes.push(Lexeme {
            token,
            column: start + 1,
            text,
        });
    }
    Ok(lexemes)
}

/// Keywords are case-insensitive; anything else is a column name.
fn word(word: String) -> Token {
    match word.to_ascii_lowercase().as_str() {
        "and" => Token::Op(BinOp::And),
        "or" => Token::Op(BinOp::Or),
        "not" => Token::Not,
        "as" => Token::As,
        "true" => Token::Literal(ScalarValue::Boolean(true)),
        "false" => Token::Literal(ScalarValue::Boolean(false)),
        "null" => Token::Literal(ScalarValue::Null),
        _ => Token::Ident(word),
    }
}

/// An operator or parenthesis starting with `c`, and its width in characters.
fn symbol(c: char, next: Option<char>) -> Option<(Token, usize)> {
    let two = match (c, next) {
        ('=', Some('=')) => Some(BinOp::Eq),
        ('!', Some('=')) | ('<', Some('>')) => Some(BinOp::NotEq),
        ('<', Some('=')) => Some(BinOp::LtEq),
        ('>', Some('=')) => Some(BinOp::GtEq),
        _ => None,
    };
    if let Some(op) = two {
        return Some((Token::Op(op), 2));
    }
    let op = match c {
        '(' => return Some((Token::LParen, 1)),
        ')' => return Some((Token::RParen, 1)),
        '=' => BinOp::Eq,
        '<' => BinOp::Lt,
        '>' => BinOp::Gt,
        '+' => BinOp::Add,
        '-' => BinOp::Sub,
        '*' => BinOp::Mul,
        '/' => BinOp::Div,
        '%' => BinOp::Mod,
        _ => return None,
    };
    Some((Token::Op(op), 1))
}

fn scan(chars: &[char], mut i: usize, accept: impl Fn(char) -> bool) -> usize {
    while i < chars.len() && accept(chars[i]) {
        i += 1;
    }
    i
}

/// `digits [. digits] [e [+-] digits]`: an Int64 unless it has a fraction or an
/// exponent.
fn lex_number(chars: &[char], start: usize) -> Result<(ScalarValue, usize), ExprError> {
    let digit = |c: char| c.is_ascii_digit();
    let mut i = scan(chars, start, digit);
    let mut is_float = false;
    if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
        i = scan(chars, i + 1, digit);
        is_float = true;
    }
    if matches!(chars.get(i), Some('e' | 'E')) {
        let sign = usize::from(matches!(chars.get(i + 1), Some('+' | '-')));
        if chars.get(i + 1 + sign).is_some_and(|c| c.is_ascii_digit()) {
            i = scan(chars, i + 1 + sign, digit);
            is_float = true;
        }
    }
    let text: String = chars[start..i].iter().collect();
    let value = if is_float {
        text.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map(ScalarValue::Float64)
    } else {
        text.parse::<i64>().ok().map(ScalarValue::Int64)
    };
    let expected = if is_float {
        "a finite number"
    } else {
        "an integer that fits in Int64"
    };
    let value = value.ok_or_else(|| syntax(start + 1, expected, format!("'{text}'")))?;
    Ok((value, i))
}

/// A quoted string; the quote character is escaped by doubling it (`'it''s'`).
fn lex_string(chars: &[char], start: usize) -> Result<(String, usize), ExprError> {
    let quote = chars[start];
    let mut value = String::new();
    let mut i = start + 1;
    loop {
        match chars.get(i) {
            None => return Err(syntax(start + 1, "a closing quote", "end of input")),
            Some(&c) if c == quote && chars.get(i + 1) == Some(&quote) => {
                value.push(quote);
                i += 2;
            }
            Some(&c) if c == quote => return Ok((value, i + 1)),
            Some(&c) => {
                value.push(c);
                i += 1;
            }
        }
    }
}

/// Precedence climbing over [`BinOp::precedence`]; `not` (3) and unary minus (7)
/// are the two prefix levels.
struct Parser {
    lexemes: Vec<Lexeme>,
    position: usize,
    /// Column just past the text, reported for "end of input".
    end_column: usize,
    depth: usize,
}

impl Parser {
    fn new(text: &str) -> Result<Parser, ExprError> {
        Ok(Parser {
            lexemes: lex(text)?,
            position: 0,
            end_column: text.chars().count() + 1,
            depth: 0,
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.lexemes.get(self.position).map(|l| &l.token)
    }

    fn error(&self, expected: &'static str) -> ExprError {
        match self.lexemes.get(self.position) {
            Some(l) => syntax(l.column, expected, format!("'{}'", l.text)),
            None => syntax(self.end_column, expected, "end of input"),
        }
    }

    fn eat(&mut self, token: &Token) -> bool {
        let matched = self.peek() == Some(token);
        self.position += usize::from(matched);
        matched
    }

    fn expect(&mut self, token: &Token, expected: &'static str) -> Result<(), ExprError> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn expect_end(&self) -> Result<(), ExprError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("an operator or end of input")),
        }
    }

    fn identifier(&mut self, expected: &'static str) -> Result<String, ExprError> {
        let Some(Token::Ident(name)) = self.peek() else {
            return Err(self.error(expected));
        };
        let name = name.clone();
        self.position += 1;
        Ok(name)
    }

    fn alias(&mut self) -> Result<Option<String>, ExprError> {
        if self.eat(&Token::As) {
            self.identifier("an output column name").map(Some)
        } else {
            Ok(None)
        }
    }

    /// Runs `parse` one level deeper, refusing to recurse without bound.
    fn nested<T>(
        &mut self,
        parse: impl FnOnce(&mut Self) -> Result<T, ExprError>,
    ) -> Result<T, ExprError> {
        if self.depth == NESTING_DEPTH_MAX {
            return Err(self.error("a less deeply nested expression"));
        }
        self.depth += 1;
        let result = parse(self);
        self.depth -= 1;
        result
    }

    fn expr(&mut self) -> Result<Expr, ExprError> {
        self.nested(|p| p.binary(1))
    }

    /// Left-associative binary operators of `precedence` and tighter.
    fn binary(&mut self, precedence: u8) -> Result<Expr, ExprError> {
        match precedence {
            3 => return self.not(),
            7 => return self.unary(),
            _ => {}
        }
        let mut left = self.binary(precedence + 1)?;
        while let Some(&Token::Op(op)) = self.peek()
            && op.precedence() == precedence
        {
            self.position += 1;
            left = binary(op, left, self.binary(precedence + 1)?);
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ExprError> {
        if self.eat(&Token::Not) {
            Ok(Expr::Not(Box::new(self.nested(Self::not)?)))
        } else {
            self.binary(4)
        }
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.eat(&Token::Op(BinOp::Sub)) {
            Ok(Expr::Neg(Box::new(self.nested(Self::unary)?)))
        } else {
            self.primary()
        }
    }

    fn primary(&mut self) -> Result<Expr, ExprError> {
        let expr = match self.peek() {
            Some(Token::LParen) => {
                self.position += 1;
                let inner = self.expr()?;
                self.expect(&Token::RParen, "')'")?;
                return Ok(inner);
            }
            Some(Token::Literal(value)) => Expr::Literal(value.clone()),
            Some(Token::Ident(name)) => Expr::Column(name.clone()),
            _ => return Err(self.error("a column, literal or '('")),
        };
        self.position += 1;
        Ok(expr)
    }
}

fn binary(op: BinOp, left: Expr, right: Expr) -> Expr {
    Expr::Binary {
        op,
        left: Box::new(left),
        right: Box::new(right),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn col(name: &str) -> Expr {
        Expr::Column(name.to_string())
    }

    fn int(v: i64) -> Expr {
        Expr::Literal(ScalarValue::Int64(v))
    }

    #[test]
    fn precedence_follows_the_documented_order() {
        let cases = [
            (
                "a + b * c",
                "a + b * c",
                binary(BinOp::Add, col("a"), binary(BinOp::Mul, col("b"), col("c"))),
            ),
            (
                "(a + b) * c",
                "(a + b) * c",
                binary(BinOp::Mul, binary(BinOp::Add, col("a"), col("b")), col("c")),
            ),
            (
                "a - b - c",
                "a - b - c",
                binary(BinOp::Sub, binary(BinOp::Sub, col("a"), col("b")), col("c")),
            ),
            (
                "a - (b - c)",
                "a - (b - c)",
                binary(BinOp::Sub, col("a"), binary(BinOp::Sub, col("b"), col("c"))),
            ),
            (
                "-a * b",
                "-a * b",
                binary(BinOp::Mul, Expr::Neg(Box::new(col("a"))), col("b")),
            ),
            (
                "a % 2 = 0",
                "a % 2 = 0",
                binary(BinOp::Eq, binary(BinOp::Mod, col("a"), int(2)), int(0)),
            ),
            (
                "not a = 1 and b or c",
                "not a = 1 and b or c",
                binary(
                    BinOp::Or,
                    binary(
                        BinOp::And,
                        Expr::Not(Box::new(binary(BinOp::Eq, col("a"), int(1)))),
                        col("b"),
                    ),
                    col("c"),
                ),
            ),
            (
                "a or b and c",
                "a or b and c",
                binary(BinOp::Or, col("a"), binary(BinOp::And, col("b"), col("c"))),
            ),
            ("x <> 1", "x != 1", binary(BinOp::NotEq, col("x"), int(1))),
            ("x == 1", "x = 1", binary(BinOp::Eq, col("x"), int(1))),
            (
                "NOT TRUE",
                "not true",
                Expr::Not(Box::new(Expr::Literal(ScalarValue::Boolean(true)))),
            ),
        ];
        for (text, display, expected) in cases {
            let parsed = Expr::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string(), display, "{text}");
        }
    }

    #[test]
    fn literals_parse_to_their_scalar_values() {
        let cases = [
            ("42", ScalarValue::Int64(42)),
            ("1.5", ScalarValue::Float64(1.5)),
            ("2e3", ScalarValue::Float64(2000.0)),
            ("'it''s'", ScalarValue::Utf8("it's".to_string())),
            ("\"dq\"", ScalarValue::Utf8("dq".to_string())),
            ("false", ScalarValue::Boolean(false)),
            ("NULL", ScalarValue::Null),
        ];
        for (text, value) in cases {
            assert_eq!(
                Expr::parse(text).unwrap_or_else(|e| panic!("{text}: {e}")),
                Expr::Literal(value)
            );
        }
    }

    #[test]
    fn syntax_errors_name_the_column_within_the_expression() {
        let cases = [
            ("value >= ", 10, "end of input"),
            ("a + * b", 5, "'*'"),
            ("(a + b", 7, "')'"),
            ("a # b", 3, "'#'"),
            ("'open", 1, "closing quote"),
            ("a b", 3, "'b'"),
            ("99999999999999999999", 1, "Int64"),
            ("and", 1, "'and'"),
        ];
        for (text, column, hint) in cases {
            let message = Expr::parse(text).expect_err(text).to_string();
            assert!(
                message.contains(&format!("column {column}:")),
                "{text}: {message}"
            );
            assert!(message.contains(hint), "{text}: {message}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let text = format!("{}a{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(Expr::parse(&text).is_err());
        assert!(Expr::parse(&"-".repeat(10_000)).is_err());
        assert!(Expr::parse(&"not ".repeat(10_000)).is_err());
    }

    #[test]
    fn named_expressions_and_aggregate_calls_parse() {
        let (expr, alias) = Expr::parse_named("value * 2 + 1 as v2").expect("valid");
        assert_eq!(expr.to_string(), "value * 2 + 1");
        assert_eq!(alias.as_deref(), Some("v2"));
        assert_eq!(Expr::parse_named("price").expect("valid").1, None);
        let call = parse_agg_call("count(*) AS cnt").expect("valid");
        assert_eq!(
            (call.func.as_str(), call.column, call.alias.as_deref()),
            ("count", None, Some("cnt"))
        );
        let call = parse_agg_call("min(v2)").expect("valid");
        assert_eq!(call.column.as_deref(), Some("v2"));
        assert!(parse_agg_call("sum(value").is_err());
    }

    fn arb_expr() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![
            "[a-z_][a-z0-9_]{0,6}"
                .prop_filter("keywords are not columns", |s| matches!(
                    word(s.clone()),
                    Token::Ident(_)
                ))
                .prop_map(Expr::Column),
            (0i64..=i64::MAX).prop_map(|v| Expr::Literal(ScalarValue::Int64(v))),
            (0.0f64..1e300).prop_map(|v| Expr::Literal(ScalarValue::Float64(v))),
            ".{0,8}".prop_map(|s| Expr::Literal(ScalarValue::Utf8(s))),
            any::<bool>().prop_map(|b| Expr::Literal(ScalarValue::Boolean(b))),
            Just(Expr::Literal(ScalarValue::Null)),
        ];
        let ops = [
            BinOp::Or,
            BinOp::And,
            BinOp::Eq,
            BinOp::NotEq,
            BinOp::Lt,
            BinOp::LtEq,
            BinOp::Gt,
            BinOp::GtEq,
            BinOp::Add,
            BinOp::Sub,
            BinOp::Mul,
            BinOp::Div,
            BinOp::Mod,
        ];
        leaf.prop_recursive(6, 48, 2, move |inner| {
            prop_oneof![
                (
                    proptest::sample::select(ops.to_vec()),
                    inner.clone(),
                    inner.clone()
                )
                    .prop_map(|(op, l, r)| binary(op, l, r)),
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                inner.prop_map(|e| Expr::Neg(Box::new(e))),
            ]
        })
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in ".{0,64}") {
            let _ = Expr::parse(&text);
            let _ = Expr::parse_named(&text);
            let _ = parse_agg_call(&text);
        }

        #[test]
        fn parse_never_panics_on_expression_like_text(text in "[a-z0-9 ()+*/%<>=!'.-]{0,48}") {
            let _ = Expr::parse(&text);
        }

        #[test]
        fn display_parses_back_to_the_same_tree(expr in arb_expr()) {
            let text = expr.to_string();
            let parsed = Expr::parse(&text);
            prop_assert!(parsed.is_ok(), "{text}: {parsed:?}");
            prop_assert_eq!(parsed.ok(), Some(expr), "{}", text);
        }
    }
}
