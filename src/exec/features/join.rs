//! `join`: enriches each stream row with the columns of a bounded
//! dimension table's row of the same key (a lookup join).
//!
//! Each subtask reads the whole table once, when its operators are built
//! (on the task's thread, before any input), through the `csv_source` and
//! `parquet_source` readers: only the key columns and the columns it adds
//! are decoded. It keeps the added columns as the Arrow arrays read and a
//! key index in a [`PagedHashTable`] whose entries point at a row (batch,
//! row), all charged to the slot's managed memory: the index is made of
//! managed pages, and pages are held for the columns' bytes. A table that
//! does not fit fails the task with
//! [`ExecError::DimensionTableTooLarge`], naming the table and the budget;
//! nothing is spilled.
//!
//! Invariants: the table holds one row per key (a key read twice fails
//! the load with [`ExecError::DuplicateDimensionKey`], naming it); a row
//! whose key has a null is never indexed, and a stream row whose key has
//! a null never matches. Output rows keep the stream's order. The
//! operator has no checkpoint state: a restored task reads the table
//! again.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, RecordBatch, RecordBatchOptions, UInt32Array};
use arrow_schema::{Schema, SchemaRef};

use crate::exec::ExecError;
use crate::exec::hashtable::{PagedHashTable, TableError, read_u64};
use crate::exec::keycodec::{KeyClass, KeyColumn, encode_key, key_class, prepare_key};
use crate::exec::operators::{Operator, Output};
use crate::exec::source::{CsvSource, ParquetSource, Source};
use crate::job::{CsvSourceSpec, JoinHow, JoinSpec, ParquetSourceSpec, TableFormat};
use crate::kernels::cpu::hash::hash_bytes;
use crate::memory::{MemoryError, MemoryManager, Page};

/// Rows per batch when reading a dimension table.
const TABLE_BATCH_ROWS: usize = 8192;
/// Bytes of an index entry's value: the batch and row it points at.
const ROW_REF_BYTES: usize = 8;

/// Where a table row lives: `(batch, row)`, as `interleave` takes it.
type RowRef = (usize, usize);

/// A dimension table held by one subtask.
struct DimensionTable {
    /// Encoded key → the row's [`RowRef`] (batch in the high half, row in
    /// the low half of the entry's 8 bytes).
    index: PagedHashTable,
    /// Per added column: its array from each batch read, then a one-row
    /// null array, the row that a left join's unmatched rows point at.
    columns: Vec<Vec<ArrayRef>>,
    null_row: RowRef,
    /// Pages held for the bytes of `columns`, given back on drop.
    _held: Vec<Page>,
}

/// What the operator needs to know besides the spec.
pub struct JoinOptions<'a> {
    pub name: &'a str,
    pub input: &'a Schema,
    pub output: SchemaRef,
    pub memory: MemoryManager,
}

/// The lookup join of the stream with a dimension table.
pub struct JoinOperator {
    table: DimensionTable,
    /// The stream's key columns, in `on` order.
    on: Vec<usize>,
    classes: Vec<KeyClass>,
    how: JoinHow,
    output: SchemaRef,
    /// Scratch: an encoded key, the kept stream rows and their table rows.
    key: Vec<u8>,
    rows: Vec<u32>,
    refs: Vec<RowRef>,
}

impl JoinOperator {
    /// Reads the dimension table into managed memory.
    pub fn open(spec: &JoinSpec, options: JoinOptions<'_>) -> Result<Self, ExecError> {
        let on = spec
            .on
            .iter()
            .map(|c| options.input.index_of(c))
            .collect::<Result<Vec<_>, _>>()?;
        let classes = on
            .iter()
            .map(|&i| {
                let data_type = options.input.field(i).data_type();
                key_class(data_type).ok_or_else(|| ExecError::Unsupported {
                    operator: options.name.to_owned(),
                    detail: format!("cannot join on a key of type {data_type}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut loader = Loader::new(options.name, spec, classes.clone(), options.memory)?;
        let mut source = open_table(spec, &loader.read_columns())?;
        while let Some(batch) = source.next_batch()? {
            loader.add(&batch)?;
        }
        let table = loader.finish()?;
        Ok(JoinOperator {
            table,
            on,
            classes,
            how: spec.how,
            output: options.output,
            key: Vec::new(),
            rows: Vec::new(),
            refs: Vec::new(),
        })
    }

    /// The table row of each stream row to keep, into `rows` and `refs`.
    fn probe(&mut self, batch: &RecordBatch) -> Result<(), ExecError> {
        let keys: Vec<&ArrayRef> = self.on.iter().map(|&i| batch.column(i)).collect();
        let columns = keys
            .iter()
            .zip(&self.classes)
            .map(|(a, c)| prepare_key(a, *c))
            .collect::<Result<Vec<_>, _>>()?;
        self.rows.clear();
        self.refs.clear();
        for row in 0..batch.num_rows() {
            let found = if keys.iter().any(|k| k.is_null(row)) {
                None
            } else {
                encode_row(&columns, row, &mut self.key);
                self.table
                    .index
                    .find(hash_bytes(&self.key), &self.key)
                    .map(|id| unpack(read_u64(self.table.index.acc(id), 0)))
            };
            let target = match (found, self.how) {
                (Some(target), _) => target,
                (None, JoinHow::Left) => self.table.null_row,
                (None, JoinHow::Inner) => continue,
            };
            self.rows.push(row as u32);
            self.refs.push(target);
        }
        Ok(())
    }
}

impl Operator for JoinOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut dyn Output) -> Result<(), ExecError> {
        self.probe(&batch)?;
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut columns: Vec<ArrayRef> = if self.rows.len() == batch.num_rows() {
            // Every row kept, in order: the stream's columns as they are.
            batch.columns().to_vec()
        } else {
            let rows = UInt32Array::from(std::mem::take(&mut self.rows));
            arrow_select::take::take_record_batch(&batch, &rows)?
                .columns()
                .to_vec()
        };
        for arrays in &self.table.columns {
            let arrays: Vec<&dyn Array> = arrays.iter().map(AsRef::as_ref).collect();
            columns.push(arrow_select::interleave::interleave(&arrays, &self.refs)?);
        }
        let options = RecordBatchOptions::new().with_row_count(Some(self.refs.len()));
        out.emit(RecordBatch::try_new_with_options(
            Arc::clone(&self.output),
            columns,
            &options,
        )?)
    }
}

/// Encodes row `row`'s key (every key column) into `out`.
fn encode_row(columns: &[KeyColumn], row: usize, out: &mut Vec<u8>) {
    out.clear();
    for column in columns {
        encode_key(column, row, out);
    }
}

fn pack((batch, row): RowRef) -> u64 {
    let batch = u32::try_from(batch).expect("fewer than 2^32 table batches");
    let row = u32::try_from(row).expect("fewer than 2^32 rows per batch");
    (u64::from(batch) << 32) | u64::from(row)
}

fn unpack(value: u64) -> RowRef {
    (
        (value >> 32) as usize,
        (value & u64::from(u32::MAX)) as usize,
    )
}

/// Reads `columns` of the dimension table with the source readers.
fn open_table(spec: &JoinSpec, columns: &[String]) -> Result<Box<dyn Source>, ExecError> {
    let table = &spec.table;
    Ok(match table.format {
        TableFormat::Csv => Box::new(CsvSource::new(
            CsvSourceSpec {
                path: table.path.clone(),
                has_header: true,
                schema: Arc::clone(&table.schema),
                batch_size: TABLE_BATCH_ROWS,
                watermark: None,
                columns: Some(columns.to_vec()),
            },
            0,
            1,
        )?),
        TableFormat::Parquet => Box::new(ParquetSource::new(
            ParquetSourceSpec {
                path: table.path.clone(),
                schema: Arc::clone(&table.schema),
                batch_size: TABLE_BATCH_ROWS,
                watermark: None,
                columns: Some(columns.to_vec()),
                prune: None,
            },
            0,
            1,
        )?),
    })
}

/// Builds a [`DimensionTable`] batch by batch, charging managed memory as
/// it grows.
struct Loader<'a> {
    name: &'a str,
    spec: &'a JoinSpec,
    added: Vec<String>,
    classes: Vec<KeyClass>,
    memory: MemoryManager,
    index: PagedHashTable,
    columns: Vec<Vec<ArrayRef>>,
    column_bytes: usize,
    held: Vec<Page>,
    batch_count: usize,
    /// Rows left out because their key has a null.
    null_keys: u64,
    key: Vec<u8>,
}

impl<'a> Loader<'a> {
    fn new(
        name: &'a str,
        spec: &'a JoinSpec,
        classes: Vec<KeyClass>,
        memory: MemoryManager,
    ) -> Result<Self, ExecError> {
        let added = spec.added_columns();
        let index = PagedHashTable::new(memory.clone(), ROW_REF_BYTES)
            .map_err(|e| table_error(name, spec, &memory, 0, e))?;
        Ok(Loader {
            name,
            spec,
            columns: vec![Vec::new(); added.len()],
            added,
            classes,
            memory,
            index,
            column_bytes: 0,
            held: Vec::new(),
            batch_count: 0,
            null_keys: 0,
            key: Vec::new(),
        })
    }

    /// The key columns, then the added ones.
    fn read_columns(&self) -> Vec<String> {
        let mut columns = self.spec.table_on.clone();
        columns.extend(self.added.iter().cloned());
        columns
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<(), ExecError> {
        let schema = batch.schema();
        for (arrays, name) in self.columns.iter_mut().zip(&self.added) {
            let array = Arc::clone(batch.column(schema.index_of(name)?));
            self.column_bytes += array.get_array_memory_size();
            arrays.push(array);
        }
        self.charge()?;
        let keys = self
            .spec
            .table_on
            .iter()
            .map(|name| Ok(Arc::clone(batch.column(schema.index_of(name)?))))
            .collect::<Result<Vec<ArrayRef>, ExecError>>()?;
        let columns = keys
            .iter()
            .zip(&self.classes)
            .map(|(a, c)| prepare_key(a, *c))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            if keys.iter().any(|k| k.is_null(row)) {
                self.null_keys += 1;
                continue;
            }
            encode_row(&columns, row, &mut self.key);
            let before = self.index.len();
            let target = pack((self.batch_count, row)).to_le_bytes();
            let id = self
                .index
                .find_or_insert(hash_bytes(&self.key), &self.key, |value| {
                    value[..ROW_REF_BYTES].copy_from_slice(&target);
                })
                .map_err(|e| {
                    table_error(self.name, self.spec, &self.memory, self.held_bytes(), e)
                })?;
            if id < before {
                return Err(ExecError::DuplicateDimensionKey {
                    operator: self.name.to_owned(),
                    table: self.spec.table.path.clone(),
                    key: key_text(&self.spec.table_on, &keys, row),
                });
            }
        }
        self.batch_count += 1;
        Ok(())
    }

    /// Holds pages for the columns' bytes.
    fn charge(&mut self) -> Result<(), ExecError> {
        let pages = self.column_bytes.div_ceil(self.memory.page_size_bytes());
        if pages > self.held.len() {
            let more = self
                .memory
                .allocate_pages(pages - self.held.len())
                .map_err(|e| {
                    let held_bytes = self.held_bytes();
                    table_error(self.name, self.spec, &self.memory, held_bytes, e.into())
                })?;
            self.held.extend(more);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<DimensionTable, ExecError> {
        let null_row = (self.batch_count, 0);
        for (arrays, name) in self.columns.iter_mut().zip(&self.added) {
            let field = self.spec.table.schema.field_with_name(name)?;
            arrays.push(arrow_array::new_null_array(field.data_type(), 1));
        }
        if self.null_keys > 0 {
            tracing::debug!(
                "{}: {} row(s) of dimension table {} have a null key and never match",
                self.name,
                self.null_keys,
                self.spec.table.path.display()
            );
        }
        tracing::debug!(
            "{}: dimension table {} loaded: {} keys, {} bytes of columns, {} bytes of index",
            self.name,
            self.spec.table.path.display(),
            self.index.len(),
            self.column_bytes,
            self.index.memory_bytes()
        );
        Ok(DimensionTable {
            index: self.index,
            columns: self.columns,
            null_row,
            _held: self.held,
        })
    }

    /// Managed bytes the table holds so far.
    fn held_bytes(&self) -> u64 {
        (self.held.len() * self.memory.page_size_bytes() + self.index.memory_bytes()) as u64
    }
}

/// The error for a table that does not fit (or otherwise cannot be
/// indexed), naming the table and the budget.
fn table_error(
    name: &str,
    spec: &JoinSpec,
    memory: &MemoryManager,
    held_bytes: u64,
    error: TableError,
) -> ExecError {
    let requested_bytes = match error {
        TableError::Memory(MemoryError::BudgetExceeded {
            requested_bytes, ..
        }) => requested_bytes,
        TableError::Memory(MemoryError::InsufficientNetworkBuffers { .. }) => 0,
        other => {
            return ExecError::Unsupported {
                operator: name.to_owned(),
                detail: format!("dimension table {}: {other}", spec.table.path.display()),
            };
        }
    };
    ExecError::DimensionTableTooLarge {
        operator: name.to_owned(),
        table: spec.table.path.clone(),
        held_bytes,
        requested_bytes,
        budget_bytes: memory.budget_bytes(),
    }
}

/// `column=value` for each key column of row `row`.
fn key_text(names: &[String], keys: &[ArrayRef], row: usize) -> String {
    names
        .iter()
        .zip(keys)
        .map(|(name, array)| {
            let value = arrow_cast::display::array_value_to_string(array.as_ref(), row)
                .unwrap_or_else(|_| "?".into());
            format!("{name}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type};
    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{DataType, Field};

    use super::*;
    use crate::job::DimensionTableSpec;

    type Sink = crate::exec::spill_tests::Collect;

    fn memory(budget_bytes: u64) -> MemoryManager {
        crate::memory::PagePool::new(64 << 20, 4 << 10).slot_manager(0, budget_bytes)
    }

    fn csv_table(dir: &Path, text: &str) -> DimensionTableSpec {
        let path = dir.join("users.csv");
        std::fs::write(&path, text).unwrap();
        DimensionTableSpec {
            schema: crate::job::infer_csv_schema(&path, true).unwrap(),
            path,
            format: TableFormat::Csv,
        }
    }

    fn spec(table: DimensionTableSpec, how: JoinHow) -> JoinSpec {
        JoinSpec {
            table,
            on: vec!["user".into()],
            table_on: vec!["id".into()],
            how,
            columns: None,
            prefix: String::new(),
        }
    }

    fn stream() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Int64, true),
            Field::new("v", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![
                    Some(3),
                    Some(9),
                    None,
                    Some(1),
                    Some(3),
                ])),
                Arc::new(Int64Array::from(vec![10, 11, 12, 13, 14])),
            ],
        )
        .unwrap()
    }

    /// The stream's schema plus the spec's added columns, as `plan` makes it.
    fn output(spec: &JoinSpec, input: &Schema) -> SchemaRef {
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        for name in spec.added_columns() {
            let field = spec.table.schema.field_with_name(&name).unwrap();
            fields.push(Field::new(
                format!("{}{name}", spec.prefix),
                field.data_type().clone(),
                true,
            ));
        }
        Arc::new(Schema::new(fields))
    }

    fn open(
        spec: &JoinSpec,
        input: &Schema,
        memory: MemoryManager,
    ) -> Result<JoinOperator, ExecError> {
        JoinOperator::open(
            spec,
            JoinOptions {
                name: "enrich",
                input,
                output: output(spec, input),
                memory,
            },
        )
    }

    fn joined(spec: &JoinSpec, batch: RecordBatch) -> Vec<RecordBatch> {
        let mut op = open(spec, &batch.schema(), memory(16 << 20)).unwrap();
        let mut out = Sink::default();
        op.process(batch, &mut out).unwrap();
        out.batches
    }

    const USERS: &str = "id,segment,score\n1,a,0.5\n3,c,2.5\n4,,\n,z,9.0\n";

    #[test]
    fn an_inner_join_adds_the_row_of_the_key_in_stream_order_and_drops_misses_and_null_keys() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(csv_table(dir.path(), USERS), JoinHow::Inner);
        let out = joined(&spec, stream());
        assert_eq!(out.len(), 1);
        let batch = &out[0];
        assert_eq!(batch.num_columns(), 4);
        let v: Vec<i64> = batch
            .column(1)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(
            v,
            [10, 13, 14],
            "users 3, 1, 3 in stream order; 9 and null dropped"
        );
        let segment: Vec<Option<&str>> = batch.column(2).as_string::<i32>().iter().collect();
        assert_eq!(segment, [Some("c"), Some("a"), Some("c")]);
        let score: Vec<Option<f64>> = batch
            .column(3)
            .as_primitive::<Float64Type>()
            .iter()
            .collect();
        assert_eq!(score, [Some(2.5), Some(0.5), Some(2.5)]);
    }

    #[test]
    fn a_left_join_keeps_every_row_with_nulls_where_the_table_has_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(csv_table(dir.path(), USERS), JoinHow::Left);
        spec.columns = Some(vec!["score".into()]);
        spec.prefix = "u_".into();
        let out = joined(&spec, stream());
        let batch = &out[0];
        assert_eq!(batch.schema().field(2).name(), "u_score");
        assert_eq!(batch.num_rows(), 5);
        let score: Vec<Option<f64>> = batch
            .column(2)
            .as_primitive::<Float64Type>()
            .iter()
            .collect();
        assert_eq!(
            score,
            [Some(2.5), None, None, Some(0.5), Some(2.5)],
            "no row for 9; a null key matches nothing, not even the table's null key"
        );
        // A table row with nulls in its added columns matches and adds nulls.
        let four = RecordBatch::try_new(
            stream().schema(),
            vec![
                Arc::new(Int64Array::from(vec![4])),
                Arc::new(Int64Array::from(vec![0])),
            ],
        )
        .unwrap();
        let out = joined(&spec, four);
        assert!(out[0].column(2).is_null(0));
    }

    #[test]
    fn a_duplicate_key_in_the_dimension_table_fails_the_load_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let table = csv_table(dir.path(), "id,segment\n1,a\n2,b\n1,c\n");
        let spec = spec(table, JoinHow::Inner);
        let error = open(&spec, &stream().schema(), memory(16 << 20))
            .err()
            .expect("a duplicate key")
            .to_string();
        assert!(
            error.contains("users.csv holds key id=1 more than once") && error.contains("'enrich'"),
            "{error}"
        );
    }

    #[test]
    fn a_table_beyond_the_memory_budget_fails_naming_the_table_and_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("id,name\n");
        for i in 0..20_000 {
            text.push_str(&format!("{i},user-number-{i}\n"));
        }
        let spec = spec(csv_table(dir.path(), &text), JoinHow::Inner);
        let budget = memory(64 << 10);
        let error = open(&spec, &stream().schema(), budget.clone())
            .err()
            .expect("too large")
            .to_string();
        assert!(
            error.contains("users.csv does not fit") && error.contains("budget 65536 bytes"),
            "{error}"
        );
        assert_eq!(
            budget.used_bytes(),
            0,
            "a refused load gives its pages back"
        );
        let roomy = memory(16 << 20);
        let op = open(&spec, &stream().schema(), roomy.clone()).unwrap();
        assert!(roomy.used_bytes() > 0, "the table's bytes are charged");
        drop(op);
        assert_eq!(roomy.used_bytes(), 0);
    }

    fn write_parquet(path: &PathBuf, batch: &RecordBatch) {
        let file = std::fs::File::create(path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn composite_string_keys_join_a_parquet_table_under_other_key_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("regions.parquet");
        let table = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("country", DataType::Utf8, false),
                Field::new("city", DataType::Utf8, true),
                Field::new("zone", DataType::Int64, false),
            ])),
            vec![
                Arc::new(StringArray::from(vec!["fr", "fr", "de"])),
                Arc::new(StringArray::from(vec![Some("paris"), Some("lyon"), None])),
                Arc::new(Int64Array::from(vec![1, 2, 3])),
            ],
        )
        .unwrap();
        write_parquet(&path, &table);
        let spec = JoinSpec {
            table: DimensionTableSpec {
                schema: table.schema(),
                path,
                format: TableFormat::Parquet,
            },
            on: vec!["c".into(), "t".into()],
            table_on: vec!["country".into(), "city".into()],
            how: JoinHow::Left,
            columns: None,
            prefix: String::new(),
        };
        let stream = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("t", DataType::Utf8, true),
                Field::new("c", DataType::Utf8, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec![
                    Some("lyon"),
                    Some("paris"),
                    None,
                    Some("paris"),
                ])),
                Arc::new(StringArray::from(vec![
                    Some("fr"),
                    Some("fr"),
                    Some("de"),
                    Some("de"),
                ])),
            ],
        )
        .unwrap();
        let out = joined(&spec, stream);
        let zone: Vec<Option<i64>> = out[0]
            .column(2)
            .as_primitive::<Int64Type>()
            .iter()
            .collect();
        assert_eq!(
            zone,
            [Some(2), Some(1), None, None],
            "(de, null) is not indexed; (de, paris) is not in the table"
        );
    }
}
