//! HF chat templates on minijinja.
//!
//! Follows what `transformers` does when it renders `tokenizer.chat_template`: a sandboxed
//! Jinja environment with `trim_blocks` and `lstrip_blocks`, the variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token` and `tools`, the `raise_exception`
//! function, `tojson`, and Python string methods (`strip`, `startswith`, ...) through
//! minijinja-contrib's pycompat.

use crate::PreprocessError;
use minijinja::{Environment, ErrorKind, context};
use serde_json::Value;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

const NAME: &str = "chat";

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    // Only templates that print today's date use this; a fixed UTC date keeps prompts
    // deterministic, which the prefix cache depends on.
    let _ = format;
    "26 Jul 2024".to_string()
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, PreprocessError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| PreprocessError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| PreprocessError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, PreprocessError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| PreprocessError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            tools => minijinja::Value::from(minijinja::value::Serde(tools)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        })
        .map_err(|e| PreprocessError::Template(describe(&e)))
    }
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t
            .render(&[json!({"role":"user","content":"Hi"})], None, true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
            None,
            None,
        )
        .unwrap();
        let err = t
            .render(&[json!({"role":"assistant","content":"x"})], None, false)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Conversation must start with user"),
            "{err}"
        );
    }

    #[test]
    fn python_methods_tojson_and_block_trimming() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m['content'].strip() }}|{{ m | tojson }}\n{% endfor %}{{ bos_token }}",
            Some("<s>".into()),
            None,
        )
        .unwrap();
        let out = t
            .render(&[json!({"role":"user","content":"  a  "})], None, false)
            .unwrap();
        // Python's json.dumps separators, as transformers' tojson.
        assert_eq!(out, "  a|{\"content\": \"  a  \", \"role\": \"user\"}\n<s>");
    }
}
