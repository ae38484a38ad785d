"""Into the engine format and back out for a look: `hf` (`qsparse convert`, a Hugging Face folder -> engine
file) and `inspect` (`qsparse inspect`). The public function is `qsparse_infer.convert` (bound in the top
package, since it shares this subpackage's name); import the module as `qsparse_infer.convert.hf`."""
