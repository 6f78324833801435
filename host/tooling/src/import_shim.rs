//! The last step of `sandgate build`: fold the import shim `wit-component` emits into the
//! policy's own module, so that a fresh instance is two core instances instead of three.
//!
//! A host function that takes or returns strings is lowered with the policy's `memory` and
//! `cabi_realloc`, which exist only once the policy's module is instantiated, while that module
//! imports the lowered function. `wit-component` breaks the cycle with two tiny modules: a
//! *shim*, instantiated first, whose functions `call_indirect` through its own table, and a
//! *fixup*, instantiated after the policy, whose element segment fills that table with the
//! lowered functions. Wasmtime instantiates each as a core instance of its own, on every check
//! in a fresh-instance-per-check runtime: the shim's alone costs ~0.5 µs (`docs/BENCHMARKS.md`).
//!
//! This pass moves the shim into the policy module: each imported host function becomes a
//! defined function at the same index with the shim's body (`call_indirect` through a new table
//! the module exports as the shim's was), and the component instantiates that module where it
//! instantiated the shim. The fixup then fills the table in the policy's own instance. Function
//! indices in the policy module do not move, so its code, element segments and names are kept
//! byte for byte. Anything not in the exact shape `wit-component` emits is left alone.
//!
//! The file is longer than the house's ~400 lines on purpose: it is one pass (read the layout,
//! check the one shape it knows, re-encode) whose checks and rewrites depend on each other, and
//! about a sixth of it is its tests. `wit-component` is pinned in the workspace because this
//! pass reads its output's exact shape.

use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use wasm_encoder::reencode::{Error as ReencodeError, Reencode, ReencodeComponent};
use wasm_encoder::{ComponentSectionId, RawSection};
use wasmparser::{
    CanonicalFunction, ComponentAlias, ExternalKind, FuncType, Instance, InstantiationArgKind, Operator, Parser,
    Payload, TableType, TypeRef,
};

/// The name `wit-component` gives the shim's table.
const SHIM_TABLE: &str = "$imports";

/// Fold the import shim of `component` into its main module and validate the result. `Ok(None)`
/// when the component has no shim; an error when it has one in a shape this pass does not know.
pub fn fold(component: &[u8]) -> Result<Option<Vec<u8>>> {
    let layout = Layout::read(component)?;
    let Some(shim_instance) = layout.shim_instance()? else { return Ok(None) };
    let (main_instance, main_module) = layout.main_instance(shim_instance)?;
    let new_main = layout.fold_shim_into_main(shim_instance, main_instance, main_module)?;
    let mut fold =
        Fold { depth: 0, modules: 0, instances: 0, main_module, shim_instance, main_instance, new_main: &new_main };
    let mut out = wasm_encoder::Component::new();
    fold.parse_component(&mut out, Parser::new(0), component).map_err(|e| anyhow::anyhow!("{e}"))?;
    let folded = out.finish();
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
        .validate_all(&folded)
        .context("the folded component does not validate")?;
    Ok(Some(folded))
}

/// The top level of a component: what this pass needs to find the shim and its users.
struct Layout<'a> {
    modules: Vec<&'a [u8]>,
    instances: Vec<Instance<'a>>,
    /// Core functions by index: `Some((instance, export))` for an alias of an instance's export.
    core_funcs: Vec<Option<(u32, &'a str)>>,
}

impl<'a> Layout<'a> {
    fn read(component: &'a [u8]) -> Result<Self> {
        let mut layout = Layout { modules: Vec::new(), instances: Vec::new(), core_funcs: Vec::new() };
        let mut depth = 0usize;
        for payload in Parser::new(0).parse_all(component) {
            let payload = payload?;
            if depth > 0 {
                match payload {
                    Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
                    Payload::End(_) => depth -= 1,
                    _ => {}
                }
                continue;
            }
            match payload {
                Payload::ModuleSection { unchecked_range, .. } => {
                    layout.modules.push(&component[unchecked_range]);
                    depth += 1;
                }
                Payload::ComponentSection { .. } => depth += 1,
                Payload::InstanceSection(reader) => {
                    for instance in reader {
                        layout.instances.push(instance?);
                    }
                }
                Payload::ComponentAliasSection(reader) => {
                    for alias in reader {
                        match alias? {
                            ComponentAlias::CoreInstanceExport { kind: ExternalKind::Func, instance_index, name } => {
                                layout.core_funcs.push(Some((instance_index, name)))
                            }
                            // Core modules from anywhere but a module section would shift the
                            // module indices this pass counts.
                            ComponentAlias::InstanceExport {
                                kind: wasmparser::ComponentExternalKind::Module, ..
                            } => {
                                bail!("the component aliases a core module from an instance")
                            }
                            _ => {}
                        }
                    }
                }
                Payload::ComponentImportSection(reader) => {
                    for import in reader {
                        ensure!(
                            !matches!(import?.ty, wasmparser::ComponentTypeRef::Module(_)),
                            "the component imports a core module"
                        );
                    }
                }
                Payload::ComponentExportSection(reader) => {
                    for export in reader {
                        ensure!(
                            export?.kind != wasmparser::ComponentExternalKind::Module,
                            "the component exports a core module"
                        );
                    }
                }
                Payload::ComponentCanonicalSection(reader) => {
                    for canon in reader {
                        if !matches!(canon?, CanonicalFunction::Lift { .. }) {
                            layout.core_funcs.push(None);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(layout)
    }

    /// The instance of a module without imports that exports the shim table.
    fn shim_instance(&self) -> Result<Option<u32>> {
        let mut found = None;
        for (index, instance) in self.instances.iter().enumerate() {
            let Instance::Instantiate { module_index, args } = instance else { continue };
            if !args.is_empty() || !Module::read(self.module(*module_index)?)?.exports.contains_key(SHIM_TABLE) {
                continue;
            }
            ensure!(found.is_none(), "more than one shim instance");
            found = Some(index as u32);
        }
        Ok(found)
    }

    /// The instance (and its module) whose imports come from the shim.
    fn main_instance(&self, shim: u32) -> Result<(u32, u32)> {
        let mut found = None;
        for (index, instance) in self.instances.iter().enumerate() {
            let Instance::Instantiate { module_index, args } = instance else { continue };
            let from_shim = args
                .iter()
                .any(|arg| self.bag_exports(arg.index).iter().any(|(_, func)| self.shim_export(*func, shim).is_some()));
            if from_shim {
                ensure!(found.is_none(), "more than one module imports from the shim");
                found = Some((index as u32, *module_index));
            }
        }
        let (instance, module) = found.context("no module imports from the shim")?;
        let instantiations = self
            .instances
            .iter()
            .filter(|i| matches!(i, Instance::Instantiate { module_index, .. } if *module_index == module))
            .count();
        ensure!(instantiations == 1, "the main module is instantiated {instantiations} times");
        ensure!(instance > shim, "the main module is instantiated before the shim");
        Ok((instance, module))
    }

    fn module(&self, index: u32) -> Result<&'a [u8]> {
        self.modules.get(index as usize).copied().with_context(|| format!("no core module {index}"))
    }

    /// The functions a bag instance (`(core instance (export ...))`) exports, by name.
    fn bag_exports(&self, instance: u32) -> Vec<(&'a str, u32)> {
        match self.instances.get(instance as usize) {
            Some(Instance::FromExports(exports)) => {
                exports.iter().filter(|e| e.kind == ExternalKind::Func).map(|e| (e.name, e.index)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The shim export a core function aliases, if it aliases one.
    fn shim_export(&self, func: u32, shim: u32) -> Option<&'a str> {
        match self.core_funcs.get(func as usize) {
            Some(Some((instance, name))) if *instance == shim => Some(name),
            _ => None,
        }
    }

    /// The main module with the shim's functions and table moved in.
    fn fold_shim_into_main(&self, shim_instance: u32, main_instance: u32, main_module: u32) -> Result<Vec<u8>> {
        let Instance::Instantiate { module_index: shim_module, .. } = self.instances[shim_instance as usize] else {
            unreachable!()
        };
        let Instance::Instantiate { args, .. } = &self.instances[main_instance as usize] else { unreachable!() };
        let shim = Module::read(self.module(shim_module)?)?;
        let main = Module::read(self.module(main_module)?)?;
        ensure!(shim.imports.is_empty() && shim.tables.len() == 1, "unexpected shim module");
        ensure!(main.tables_imported == 0, "the main module imports a table");
        let table_index = main.tables.len() as u32;

        // Each imported function of the main module becomes the shim function it was given.
        let mut trampolines = Vec::new();
        for import in &main.imports {
            let TypeRef::Func(type_index) = import.ty else {
                bail!("the main module imports a non-function `{}`", import.name)
            };
            let arg = args
                .iter()
                .find(|a| a.name == import.module && a.kind == InstantiationArgKind::Instance)
                .with_context(|| format!("no argument for `{}`", import.module))?;
            let (_, func) = self
                .bag_exports(arg.index)
                .into_iter()
                .find(|(name, _)| *name == import.name)
                .with_context(|| format!("`{}` is not provided", import.name))?;
            let export = self
                .shim_export(func, shim_instance)
                .with_context(|| format!("`{}` does not come from the shim", import.name))?;
            let shim_func = *shim
                .exports
                .get(export)
                .filter(|(kind, _)| *kind == ExternalKind::Func)
                .with_context(|| format!("the shim has no function `{export}`"))?;
            let (shim_type, slot) = shim.indirect_call(shim_func.1)?;
            ensure!(
                shim.types.get(shim_type as usize) == main.types.get(type_index as usize),
                "`{}` has a different type in the shim",
                import.name
            );
            trampolines.push((export, type_index, slot));
        }
        // Every shim export must now be found in the main module.
        ensure!(
            shim.exports.len() == trampolines.len() + 1,
            "the shim exports functions the main module does not import"
        );
        for name in shim.exports.keys() {
            ensure!(!main.exports.contains_key(name), "the main module already exports `{name}`");
        }
        main.rewrite(&trampolines, table_index, &shim.tables[0])
    }
}

/// What this pass reads of a core module.
struct Module<'a> {
    bytes: &'a [u8],
    types: Vec<FuncType>,
    imports: Vec<wasmparser::Import<'a>>,
    tables_imported: usize,
    tables: Vec<TableType>,
    exports: HashMap<&'a str, (ExternalKind, u32)>,
    functions: Vec<u32>,
    bodies: Vec<wasmparser::FunctionBody<'a>>,
}

impl<'a> Module<'a> {
    fn read(bytes: &'a [u8]) -> Result<Self> {
        let mut module = Module {
            bytes,
            types: Vec::new(),
            imports: Vec::new(),
            tables_imported: 0,
            tables: Vec::new(),
            exports: HashMap::new(),
            functions: Vec::new(),
            bodies: Vec::new(),
        };
        for payload in Parser::new(0).parse_all(bytes) {
            match payload? {
                Payload::TypeSection(reader) => {
                    for ty in reader.into_iter_err_on_gc_types() {
                        module.types.push(ty?);
                    }
                }
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        let import = import?;
                        match import.ty {
                            TypeRef::Table(_) => module.tables_imported += 1,
                            TypeRef::Func(_) => module.imports.push(import),
                            _ => bail!("the module imports `{}` of a kind this pass does not fold", import.name),
                        }
                    }
                }
                Payload::TableSection(reader) => {
                    for table in reader {
                        module.tables.push(table?.ty);
                    }
                }
                Payload::FunctionSection(reader) => {
                    for f in reader {
                        module.functions.push(f?);
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export?;
                        module.exports.insert(export.name, (export.kind, export.index));
                    }
                }
                Payload::CodeSectionEntry(body) => module.bodies.push(body),
                _ => {}
            }
        }
        Ok(module)
    }

    /// A shim function's type and table slot: its body must be exactly
    /// `local.get 0 .. local.get n-1; i32.const slot; call_indirect (type t) (table 0)`.
    fn indirect_call(&self, func: u32) -> Result<(u32, i32)> {
        let defined = (func as usize).checked_sub(self.imports.len()).context("a shim export is an import")?;
        let (Some(&ty), Some(body)) = (self.functions.get(defined), self.bodies.get(defined)) else {
            bail!("shim function {func} is not defined")
        };
        let params = self.types.get(ty as usize).context("bad shim type")?.params().len() as u32;
        let ops: Vec<Operator> = body.get_operators_reader()?.into_iter().collect::<Result<_, _>>()?;
        let locals = body.get_locals_reader()?.get_count();
        let n = params as usize;
        let shaped = locals == 0
            && ops.len() == n + 3
            && ops[..n]
                .iter()
                .enumerate()
                .all(|(i, op)| matches!(op, Operator::LocalGet { local_index } if *local_index as usize == i))
            && matches!(ops[n + 2], Operator::End);
        match (&ops.get(n), &ops.get(n + 1)) {
            (Some(Operator::I32Const { value }), Some(Operator::CallIndirect { type_index, table_index: 0 }))
                if shaped && *type_index == ty =>
            {
                Ok((ty, *value))
            }
            _ => bail!("shim function {func} is not a plain indirect call"),
        }
    }

    /// This module with its imported functions replaced by indirect calls through a new table.
    fn rewrite(&self, trampolines: &[(&str, u32, i32)], table_index: u32, table: &TableType) -> Result<Vec<u8>> {
        let mut out = wasm_encoder::Module::new();
        let mut table_written = false;
        let write_table = |out: &mut wasm_encoder::Module, existing: &[TableType]| -> Result<()> {
            let mut section = wasm_encoder::TableSection::new();
            for t in existing.iter().chain([table]) {
                section.table(
                    wasm_encoder::reencode::RoundtripReencoder.table_type(*t).map_err(|e| anyhow::anyhow!("{e}"))?,
                );
            }
            out.section(&section);
            Ok(())
        };
        for payload in Parser::new(0).parse_all(self.bytes) {
            let payload = payload?;
            // Section order: type (1), import (2), function (3), table (4), then memory (5), tag
            // (13), global (6), export (7), start (8), element (9), data count (12), code (10),
            // data (11): the table goes before the first section with an id in 5..=13.
            let id = payload.as_section().map(|(id, _)| id);
            if !table_written && matches!(id, Some(5..=13)) {
                write_table(&mut out, &self.tables)?;
                table_written = true;
            }
            match payload {
                Payload::ImportSection(_) => {} // every import is a host function, folded below
                Payload::FunctionSection(reader) => {
                    let mut section = wasm_encoder::FunctionSection::new();
                    for (_, ty, _) in trampolines {
                        section.function(*ty);
                    }
                    for f in reader {
                        section.function(f?);
                    }
                    out.section(&section);
                }
                Payload::TableSection(_) => {
                    write_table(&mut out, &self.tables)?;
                    table_written = true;
                }
                Payload::ExportSection(reader) => {
                    let mut section = wasm_encoder::ExportSection::new();
                    for export in reader {
                        let export = export?;
                        section.export(
                            export.name,
                            wasm_encoder::reencode::RoundtripReencoder
                                .export_kind(export.kind)
                                .map_err(|e| anyhow::anyhow!("{e}"))?,
                            export.index,
                        );
                    }
                    for (func, (name, _, _)) in trampolines.iter().enumerate() {
                        section.export(name, wasm_encoder::ExportKind::Func, func as u32);
                    }
                    section.export(SHIM_TABLE, wasm_encoder::ExportKind::Table, table_index);
                    out.section(&section);
                }
                // Written whole where it starts: its bodies were read by `Module::read`.
                Payload::CodeSectionStart { .. } => {
                    let mut section = wasm_encoder::CodeSection::new();
                    for (_, ty, slot) in trampolines {
                        let params = self.types.get(*ty as usize).context("bad import type")?.params().len() as u32;
                        let mut f = wasm_encoder::Function::new([]);
                        for local in 0..params {
                            f.instruction(&wasm_encoder::Instruction::LocalGet(local));
                        }
                        f.instruction(&wasm_encoder::Instruction::I32Const(*slot));
                        f.instruction(&wasm_encoder::Instruction::CallIndirect { type_index: *ty, table_index });
                        f.instruction(&wasm_encoder::Instruction::End);
                        section.function(&f);
                    }
                    for body in &self.bodies {
                        section.raw(body.as_bytes());
                    }
                    out.section(&section);
                }
                Payload::CodeSectionEntry(_) | Payload::End(_) => {}
                other => {
                    if let Some((id, range)) = other.as_section() {
                        out.section(&RawSection { id, data: &self.bytes[range] });
                    }
                }
            }
        }
        ensure!(table_written, "the module has no sections after its tables");
        Ok(out.finish())
    }
}

/// Re-encodes the component with the main module where the shim was instantiated.
struct Fold<'a> {
    depth: u32,
    modules: u32,
    instances: u32,
    main_module: u32,
    shim_instance: u32,
    main_instance: u32,
    new_main: &'a [u8],
}

impl Reencode for Fold<'_> {
    type Error = std::convert::Infallible;
}

impl ReencodeComponent for Fold<'_> {
    fn instance_index(&mut self, instance: u32) -> u32 {
        // Everything the main instance exported, the folded module exports from the shim's slot.
        if self.depth == 0 && instance == self.main_instance { self.shim_instance } else { instance }
    }

    fn push_depth(&mut self) {
        self.depth += 1;
    }

    fn pop_depth(&mut self) {
        self.depth -= 1;
    }

    fn parse_component_submodule(
        &mut self,
        component: &mut wasm_encoder::Component,
        _parser: Parser,
        module: &[u8],
    ) -> Result<(), ReencodeError<Self::Error>> {
        let index = self.modules;
        if self.depth == 0 {
            self.modules += 1;
        }
        let data = if self.depth == 0 && index == self.main_module { self.new_main } else { module };
        component.section(&RawSection { id: ComponentSectionId::CoreModule as u8, data });
        Ok(())
    }

    fn parse_instance(
        &mut self,
        instances: &mut wasm_encoder::InstanceSection,
        instance: Instance<'_>,
    ) -> Result<(), ReencodeError<Self::Error>> {
        let index = self.instances;
        if self.depth == 0 {
            self.instances += 1;
        }
        if self.depth == 0 && index == self.shim_instance {
            instances.instantiate(self.main_module, std::iter::empty::<(&str, wasm_encoder::ModuleArg)>());
        } else if self.depth == 0 && index == self.main_instance {
            // Its index is kept (later definitions count on it) but nothing refers to it.
            instances.export_items(std::iter::empty::<(&str, wasm_encoder::ExportKind, u32)>());
        } else {
            wasm_encoder::reencode::component_utils::parse_instance(self, instances, instance)?;
        }
        Ok(())
    }

    fn parse_component_custom_section(
        &mut self,
        component: &mut wasm_encoder::Component,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> Result<(), ReencodeError<Self::Error>> {
        // Debug names of core instances would now name one index twice: leave them out.
        if section.name() != "component-name" {
            component
                .section(&wasm_encoder::CustomSection { name: section.name().into(), data: section.data().into() });
        }
        Ok(())
    }
}

/// How many core instances a component instantiates at its top level (a fresh check creates
/// each of them).
pub fn core_instantiations(component: &[u8]) -> Result<usize> {
    Ok(Layout::read(component)?.instances.iter().filter(|i| matches!(i, Instance::Instantiate { .. })).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::component::{Component, Linker};
    use wasmtime::{Engine, Store};

    /// The shape `wit-component` gives a policy importing one host function taking a string.
    const WITH_SHIM: &str = r#"(component
      (import "host" (instance $host (export "log" (func (param "m" string)))))
      (core module $main
        (import "host" "log" (func $log (param i32 i32)))
        (table 1 1 funcref)
        (memory (export "memory") 1)
        (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) i32.const 64)
        (func (export "run") (call $log (i32.const 0) (i32.const 2)))
        (data (i32.const 0) "hi"))
      (core module $shim
        (type (func (param i32 i32)))
        (table (export "$imports") 1 1 funcref)
        (func (export "0") (type 0) local.get 0 local.get 1 i32.const 0 call_indirect (type 0)))
      (core module $fixup
        (type (func (param i32 i32)))
        (import "" "0" (func (type 0)))
        (import "" "$imports" (table 1 1 funcref))
        (elem (i32.const 0) func 0))
      (core instance $shim (instantiate $shim))
      (core instance $bag (export "log" (func $shim "0")))
      (core instance $main (instantiate $main (with "host" (instance $bag))))
      (alias core export $main "memory" (core memory $mem))
      (alias core export $shim "$imports" (core table $t))
      (alias export $host "log" (func $log))
      (core func $lowered (canon lower (func $log) (memory $mem)))
      (core instance $fixup (instantiate $fixup (with "" (instance (export "$imports" (table $t)) (export "0" (func $lowered))))))
      (func (export "run") (canon lift (core func $main "run")))
    )"#;

    /// Instantiate `component`, call its `run`, return what it logged through the host.
    fn run(component: &[u8]) -> Vec<String> {
        let engine = Engine::default();
        let component = Component::new(&engine, component).expect("component compiles");
        let mut linker = Linker::<Vec<String>>::new(&engine);
        linker
            .root()
            .instance("host")
            .unwrap()
            .func_wrap("log", |mut store, (m,): (String,)| {
                store.data_mut().push(m);
                Ok(())
            })
            .unwrap();
        let mut store = Store::new(&engine, Vec::new());
        let instance = linker.instantiate(&mut store, &component).expect("instantiates");
        instance.get_typed_func::<(), ()>(&mut store, "run").unwrap().call(&mut store, ()).expect("runs");
        store.into_data()
    }

    #[test]
    fn folds_the_shim_into_the_main_module() {
        let original = wat::parse_str(WITH_SHIM).unwrap();
        let folded = fold(&original).unwrap().expect("there is a shim to fold");
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all()).validate_all(&folded).expect("valid");
        assert_eq!(core_instantiations(&original).unwrap(), 3);
        assert_eq!(core_instantiations(&folded).unwrap(), 2);
        // The host call goes through the folded table with its argument intact.
        assert_eq!(run(&original), ["hi"]);
        assert_eq!(run(&folded), ["hi"]);
        // The main module now defines the import at the same index and owns the shim's table.
        let layout = Layout::read(&folded).unwrap();
        let main = Module::read(layout.modules[0]).unwrap();
        assert!(main.imports.is_empty());
        assert_eq!(main.tables.len(), 2);
        assert_eq!(main.exports.get(SHIM_TABLE), Some(&(ExternalKind::Table, 1)));
        assert_eq!(main.exports.get("0"), Some(&(ExternalKind::Func, 0)));
    }

    #[test]
    fn a_component_without_a_shim_is_left_alone() {
        let plain = wat::parse_str(
            r#"(component (core module $m (memory (export "memory") 1)) (core instance (instantiate $m)))"#,
        )
        .unwrap();
        assert!(fold(&plain).unwrap().is_none());
    }

    #[test]
    fn a_shim_of_another_shape_is_refused() {
        // A shim function doing more than forwarding: folding it would change behaviour.
        let odd = WITH_SHIM.replace(
            "local.get 0 local.get 1 i32.const 0 call_indirect (type 0)",
            "local.get 0 local.get 1 i32.const 0 call_indirect (type 0) nop",
        );
        let error = fold(&wat::parse_str(&odd).unwrap()).unwrap_err();
        assert!(format!("{error:#}").contains("not a plain indirect call"), "{error:#}");
    }
}
